"""``multitoken bench``: is self-speculative decoding faster than the alternatives, here, really?

A high τ can come with a wall-clock slowdown (drafting costs time, and a verify pass over K+1
tokens costs more than a pass over 1), and a weak trunk that loops inflates τ (shared/DESIGN.md
§Figures, §Measured). So every method below decodes the same prompts greedily, one prompt at a
time, exactly ``max_new_tokens`` tokens each (EOS stops nobody). Each one is checked token for
token against our plain decoding and timed. The report adds the machine (CPU kind, threads,
precision), the verify-cost curve c(q) = time(trunk pass over q new tokens) / time(1 token) —
measured first, by the same function ``--draft-len auto`` uses, and kept for its runs — which
bounds the speedup at τ / c(K+1), the heads' drafting cost per step, and the trunk's validation
loss, without which τ cannot be read. Every τ is measured on the trunk's own greedy output, not
on validation text.

    plain           ours, the trunk alone: the reference output
    speculative     ours, self-speculative with K drafts, for each K
    auto            ours, self-speculative with K chosen before each step (``--draft-len auto``)
    hf_greedy       ``model.trunk.generate`` greedy: the baseline a user would otherwise run
    prompt_lookup   ``generate(prompt_lookup_num_tokens=N)``: speculation without a draft model
    assisted        ``generate(assistant_model=...)`` with a separate small draft model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from multitoken.config import GenerateConfig, RuntimeConfig
from multitoken.costs import remember_cost, verify_cost
from multitoken.errors import MultitokenError
from multitoken.generate import generate
from multitoken.hardware import cpu_kind, place_for_decoding, sync
from multitoken.heads import head_class
from multitoken.kernels import choose_linear_kernel, linear_kernels
from multitoken.model import MTPModel
from multitoken.prompts import read_prompt_records, window_prompts

PLAIN, SPECULATIVE, AUTO = "plain", "speculative", "auto"
HF_GREEDY, PROMPT_LOOKUP, ASSISTED = "hf_greedy", "prompt_lookup", "assisted"
OURS_SPECULATIVE = (SPECULATIVE, AUTO)

# A method decodes one prompt: (new tokens, trunk passes, our Stats or None for transformers').
Decode = Callable[[list[int]], tuple[list[int], int, object]]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def default_draft_lens(family: str, depth: int) -> list[int]:
    """1..D; heads that can draft past D (DeepSeek's last module recurs) add D+2."""
    past = head_class(family).drafts_past_depth
    return list(range(1, depth + 1)) + ([depth + 2] if past else [])


def parse_draft_lens(text: str | None, family: str, depth: int) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4], checked against what the head family can draft."""
    if text is None:
        return default_draft_lens(family, depth)
    try:
        lens = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise MultitokenError(
            f"expected integers like 1,2,4, got {text!r}", "--draft-lens"
        ) from None
    if not lens or lens[0] < 1:
        raise MultitokenError(f"draft lengths must be >= 1, got {text!r}", "--draft-lens")
    if not head_class(family).drafts_past_depth and lens[-1] > depth:
        raise MultitokenError(
            f"{family} heads draft at most D = {depth} tokens; got {lens[-1]}", "--draft-lens"
        )
    return lens


def read_prompt_file(path: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of the prompts in a file, as the model expects them (see
    :meth:`multitoken.prompts.Prompt.encode`)."""
    return [prompt.encode(tokenizer) for prompt in read_prompt_records(path)]


def load_draft_model(path: str | Path, vocab_size: int) -> PreTrainedModel:
    """A transformers causal-LM folder, or a multitoken checkpoint/run folder (its trunk)."""
    from multitoken.checkpoint import checkpoint_trunk, is_run_or_checkpoint
    from multitoken.trunk import load_trunk

    try:
        draft = checkpoint_trunk(path) if is_run_or_checkpoint(path) else load_trunk(path)
    except MultitokenError as exc:
        raise MultitokenError(exc.message, "--draft-model") from None
    theirs = draft.get_output_embeddings().weight.shape[0]
    if theirs != vocab_size:
        raise MultitokenError(
            f"the draft model has {theirs} tokens, the trunk {vocab_size}: assisted generation "
            "needs the same tokenizer",
            "--draft-model",
        )
    return draft.eval()


def check_fits(model: MTPModel, prompts: list[list[int]], new: int, K: int, flag: str) -> None:
    """Fail before any timing if a prompt plus its continuation overflows the context window."""
    limit = getattr(model.trunk.config, "max_position_embeddings", None)
    longest = max(map(len, prompts))
    if limit and longest + new + K + 1 > limit:
        raise MultitokenError(
            f"a prompt of {longest} tokens + {new} new + {K + 1} verified exceeds the trunk's "
            f"context window of {limit}",
            flag,
        )


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def outputs_identical(outputs: list[list[int]], reference: list[list[int]]) -> bool:
    """True when every prompt's output equals the reference token for token (same length too)."""
    return len(outputs) == len(reference) and all(
        list(a) == list(b) for a, b in zip(outputs, reference)
    )


def ours(model: MTPModel, new: int, K: int | str | None, kernel: str = "torch") -> Decode:
    """Our decoder for one prompt; ``K`` None is plain decoding (the trunk alone), ``"auto"``
    chooses K before each step; ``kernel``: of the linear layers."""

    def decode(prompt: list[int]):
        spec = dict(draft_len=K or 1, speculate=K is not None, temperature=0.0)
        spec.update(linear_kernel=kernel)
        out = generate(model, [prompt], max_new_tokens=new, eos_id=None, **spec)
        return out.tokens[0], out.stats.trunk_passes, out.stats

    return decode


def transformers_method(model: MTPModel, new: int, passes: list[int], **extra) -> Decode:
    """``model.trunk.generate`` greedy for one prompt; ``passes[0]`` counts trunk calls.
    ``eos_token_id=None`` keeps it going: ``min_new_tokens`` would instead mask EOS and so
    change the output."""
    from multitoken.trunk import quiet_transformers

    device = model.parts.embed.weight.device
    options = dict(max_new_tokens=new, eos_token_id=None, **extra)

    def decode(prompt: list[int]):
        ids = torch.tensor([prompt], device=device)
        passes[0] = 0
        mask = torch.ones_like(ids)
        with quiet_transformers(warnings=False):  # assisted generation warns on every call
            out = model.trunk.generate(ids, attention_mask=mask, do_sample=False, **options)
        return out[0, ids.shape[1] :].tolist(), passes[0], None

    return decode


def pooled_acceptance(stats: list) -> list[float]:
    """a_k over all prompts: summed hits / summed tries. A mean of per-prompt ratios would
    over-weight prompts on which a head was tried only a few times."""
    if not all(hasattr(s, "head_tries") for s in stats):
        return [statistics.fmean(col) for col in zip(*(s.acceptance for s in stats))]
    tries = [sum(col) for col in zip(*(s.head_tries for s in stats))]
    hits = [sum(col) for col in zip(*(s.head_hits for s in stats))]
    return [h / t if t else 0.0 for h, t in zip(hits, tries)]


def measure(
    name: str,
    K: int | None,
    decode: Decode,
    prompts: list[list[int]],
    reference: list[list[int]] | None,
    device: torch.device,
    repeats: int = 1,
    tick: Callable[[], None] = lambda: None,
) -> tuple[dict, list[list[int]]]:
    """One method: an untimed warm-up prompt, then every prompt ``repeats`` times. Wall time is
    the median over repeats of the summed per-prompt times (only the decode call is timed).
    Returns the run's summary and the first repeat's outputs (compared to ``reference``; with
    no reference, the method is the reference)."""
    decode(prompts[0])
    walls, repeat_outputs, passes, stats = [], [], 0, []
    for repeat in range(repeats):
        wall, outputs = 0.0, []
        for prompt in prompts:
            sync(device)
            start = time.perf_counter()
            tokens, n_passes, st = decode(prompt)
            sync(device)
            wall += time.perf_counter() - start
            outputs.append(tokens)
            if repeat == 0:
                passes, stats = passes + n_passes, stats + [st]
            tick()
        walls.append(wall)
        repeat_outputs.append(outputs)
    reference = repeat_outputs[0] if reference is None else reference
    tokens, wall = sum(map(len, repeat_outputs[0])), statistics.median(walls)
    run = {
        "method": name,
        "draft_len": K,
        "tau": tokens / passes if passes else None,
        "acceptance": pooled_acceptance(stats) if name in OURS_SPECULATIVE else None,
        "trunk_passes": passes,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "speedup_vs_plain": None,  # filled in once every method has run
        "speedup_vs_hf_greedy": None,
        "identical": all(outputs_identical(outs, reference) for outs in repeat_outputs),
    }
    if name in OURS_SPECULATIVE:
        run.update(_drafting(stats))
    return run, repeat_outputs[0]


def _drafting(stats: list) -> dict:
    """The K each step drafted (pooled over prompts) and the heads' time per drafting step."""
    ks = [k for s in stats for k in s.draft_lens]
    steps = sum(s.draft_steps for s in stats)
    return {
        "draft_len_counts": {str(k): ks.count(k) for k in sorted(set(ks))},
        "mean_draft_len": statistics.fmean(ks) if ks else 0.0,
        "draft_ms_per_step": 1e3 * sum(s.draft_s for s in stats) / steps if steps else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def bench(
    model: MTPModel,
    prompts: list[list[int]],
    draft_lens: list[int],
    max_new_tokens: int,
    draft_model: PreTrainedModel | None = None,
    prompt_lookup: int = 3,
    repeats: int = 1,
    progress: bool = True,
    also: dict[str, MTPModel] | None = None,
    linear_kernel: str = GenerateConfig.linear_kernel,
) -> dict:
    """Run every method on ``prompts``; return ``{"runs": [...], "verify_cost": {...},
    "repeated_8gram_share": x, "device", "cpu", "threads", "dtype"}`` (see
    :func:`repeated_ngram_share`).

    A run holds method, draft_len, tau, acceptance, trunk_passes, tokens, wall_s, tokens_per_s,
    speedup_vs_plain, speedup_vs_hf_greedy, identical; speculative and auto runs add
    verify_bound = τ / c(K+1) (auto: over the K its steps chose), the speedup if drafting were
    free, draft_ms_per_step and draft_cost (the heads' time per drafting step, in ms and in
    units of a one-token trunk pass), mean_draft_len and draft_len_counts. ``prompt_lookup`` 0
    skips prompt lookup; ``draft_model`` None skips assisted generation.

    ``linear_kernel``: what our decoders run the linear layers on (:mod:`multitoken.kernels`;
    c(q) is measured on it too); transformers' methods always run on torch's own.

    ``also``: more heads on the same trunk object (``multitoken.headfile.load_heads``), by label.
    The baselines run once; each set of heads gets its speculative and auto rows, and every
    row of ours names its heads (``"heads"``: the label, or ``model``'s family).
    """
    from tqdm import tqdm

    if not prompts or not draft_lens or max_new_tokens < 1 or repeats < 1 or prompt_lookup < 0:
        raise MultitokenError(
            "need prompts, draft lengths, max_new_tokens >= 1, repeats >= 1, prompt_lookup >= 0"
        )
    heads = {model.family: model, **(also or {})}
    if any(m.trunk is not model.trunk for m in heads.values()):
        raise MultitokenError("every set of heads must sit on the same trunk object")
    depth = max(m.depth for m in heads.values())
    longest = max(draft_lens + [prompt_lookup, depth])  # auto drafts up to D
    check_fits(model, prompts, max_new_tokens, longest, "prompts")
    device, new, passes = model.parts.embed.weight.device, max_new_tokens, [0]
    vocab = model.trunk.get_output_embeddings().weight.shape[0]
    kernel = choose_linear_kernel(linear_kernel, model)
    methods = [(PLAIN, None, ours(model, new, None, kernel), None)]
    for label, m in heads.items():
        longest = m.heads.max_draft_len()
        lens = [K for K in draft_lens if longest is None or K <= longest]
        methods += [(SPECULATIVE, K, ours(m, new, K, kernel), label) for K in lens]
        methods.append((AUTO, None, ours(m, new, "auto", kernel), label))
    methods.append((HF_GREEDY, None, transformers_method(model, new, passes), None))
    if prompt_lookup:
        lookup = transformers_method(model, new, passes, prompt_lookup_num_tokens=prompt_lookup)
        methods.append((PROMPT_LOOKUP, prompt_lookup, lookup, None))
    if draft_model is not None:
        assistant = draft_model.to(device)
        assisted = transformers_method(model, new, passes, assistant_model=assistant)
        methods.append((ASSISTED, None, assisted, None))

    # c(q) first, on a machine not yet warmed by decoding; auto K then uses this same curve
    q_max = max(draft_lens + [depth]) + 1
    with torch.no_grad(), linear_kernels(model, kernel):
        cost = verify_cost(model.trunk, prompts[0], q_max)
        remember_cost(model.trunk, cost)  # keyed by the kernel: auto K finds it
    hook = model.trunk.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    # disable=None: a bar on a terminal only, so logs and pipes stay clean
    bar = tqdm(total=len(methods) * repeats * len(prompts), disable=None if progress else True)
    runs, reference = [], None
    try:
        with torch.no_grad():
            for name, K, decode, label in methods:
                what = name if K is None else f"{name} K={K}"
                bar.set_description(what if label is None else f"{label} {what}")
                run, outputs = measure(
                    name, K, decode, prompts, reference, device, repeats, bar.update
                )
                if label is not None:  # which heads, and how many tokens they draft from
                    run["heads"] = label
                    run["draft_vocab"] = heads[label].head_config.draft_vocab or vocab
                if reference is None:  # the first method, plain decoding, is the reference
                    reference = outputs
                runs.append(run)
    finally:
        bar.close()
        hook.remove()
    _add_speedups(runs, cost)
    repeats_share = repeated_ngram_share(prompts, reference)
    machine = {
        "device": str(device),
        "cpu": cpu_kind(),
        "threads": torch.get_num_threads(),
        "dtype": str(model.parts.embed.weight.dtype).removeprefix("torch."),
        "linear_kernel": kernel,
    }
    return {"runs": runs, "verify_cost": cost, "repeated_8gram_share": repeats_share, **machine}


def repeated_ngram_share(prompts: list[list[int]], outputs: list[list[int]], n: int = 8) -> float:
    """Share of generated tokens that complete an n-gram already present earlier in the prompt or
    the output. High values mean looping continuations, which any drafter (prompt lookup too)
    predicts: τ measured on them says more about the loop than about the heads."""
    hits = total = 0
    for prompt, output in zip(prompts, outputs):
        seq = list(prompt) + list(output)
        seen: set[tuple[int, ...]] = set()
        for end in range(n, len(seq) + 1):
            gram = tuple(seq[end - n : end])
            if end > len(prompt):
                total += 1
                hits += gram in seen
            seen.add(gram)
    return hits / total if total else 0.0


def _add_speedups(runs: list[dict], cost: dict) -> None:
    """Speedups are ratios of tokens/s; every method emitted the same number of tokens."""
    base = {r["method"]: r["tokens_per_s"] for r in runs if r["method"] in (PLAIN, HF_GREEDY)}
    c = dict(zip(cost["q"], cost["c"]))
    for r in runs:
        for key, method in (("speedup_vs_plain", PLAIN), ("speedup_vs_hf_greedy", HF_GREEDY)):
            r[key] = r["tokens_per_s"] / base[method] if base.get(method) else None
        if r["method"] in OURS_SPECULATIVE:
            r["draft_cost"] = r["draft_ms_per_step"] / 1e3 / cost["t1_s"]
        if r["method"] == SPECULATIVE and r["tau"] is not None:
            r["verify_bound"] = r["tau"] / c[r["draft_len"] + 1]
        if r["method"] == AUTO and r["tau"] is not None:
            counts = {int(k): n for k, n in r["draft_len_counts"].items()}
            mean_c = sum(c[k + 1] * n for k, n in counts.items()) / max(1, sum(counts.values()))
            r["verify_bound"] = r["tau"] / mean_c


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to the CLI's subcommands (built with the subparsers' own parser class)."""
    p = subparsers.add_parser(
        "bench",
        help="measure decoding speed: ours (plain, speculative) vs transformers' methods",
        description="Decode the same prompts greedily with every method, check that the outputs "
        "are identical, and report tau, per-head acceptance, tokens/s, speedups, the verify-cost "
        "curve c(q) and the trunk's validation loss.",
    )
    add = p.add_argument
    add(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint or run folder, or a plain transformers model folder (with --heads)",
    )
    add(
        "--heads",
        nargs="+",
        metavar="DIR",
        help="heads folder(s) or runs to attach to that trunk; several are measured side by side "
        "against one set of baselines",
    )
    add("--draft-lens", metavar="K,...", help="e.g. 1,2,4 (default: 1..D; deepseek adds D+2)")
    add(
        "--prompts",
        metavar="FILE",
        help='one prompt per line, or .jsonl with a "text" or a "messages" chat (rendered with '
        "the chat template)",
    )
    add(
        "--data",
        nargs="+",
        metavar="SPEC",
        help="corpus whose validation split gives the prompts and the trunk's validation loss "
        "(default: the checkpoint's training data; 'stdlib' for the default corpus; use "
        "it when the heads were trained on distilled text)",
    )
    add("--num-prompts", type=int, metavar="N", help="default: 8, or all of --prompts FILE")
    add("--prompt-tokens", type=int, metavar="N", default=64, help="prompt length (default: 64)")
    add("--max-new-tokens", type=int, metavar="N", default=64, help="per prompt (default: 64)")
    add("--draft-model", metavar="DIR", help="small model (same vocabulary) for assisted")
    add("--prompt-lookup", type=int, metavar="N", default=3, help="0: off (default: 3)")
    add("--repeats", type=int, metavar="N", default=1, help="timed passes per method (default: 1)")
    add("--json", metavar="FILE", help="write every figure as JSON")
    add("--plot", metavar="FILE", help="write a PNG: acceptance and speedup against K")
    kernel = next(f for f in dataclasses.fields(GenerateConfig) if f.name == "linear_kernel")
    add(
        "--linear-kernel",
        default=kernel.default,
        choices=kernel.metadata["choices"],
        help=f"{kernel.metadata['help']} (default: {kernel.default})",
    )
    return p


_LEAST = {"num_prompts": 1, "prompt_tokens": 1, "repeats": 1, "prompt_lookup": 0}


def _check_numbers(args: argparse.Namespace) -> None:
    # the decoding options bench shares with generate are checked where generate's are
    GenerateConfig(max_new_tokens=args.max_new_tokens, linear_kernel=args.linear_kernel).validate()
    for name, least in _LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise MultitokenError(f"must be >= {least}, got {value}", "--" + name.replace("_", "-"))


def _output_path(value: str | None, flag: str) -> Path | None:
    """Checked before minutes of measuring, not after."""
    path = None if value is None else Path(value)
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise MultitokenError(f"cannot write {path}: not a file in an existing folder", flag)
    return path


def _prompts(args: argparse.Namespace, tokenizer, corpus, corpus_error: str | None):
    """(prompts, where they came from, the flag to blame if they are too long)."""
    from multitoken.data import FULL_SPAN, iter_texts

    if args.prompts is not None:
        prompts = read_prompt_file(args.prompts, tokenizer)[: args.num_prompts]
        return prompts, str(args.prompts), "--prompts"
    if corpus is None:
        raise MultitokenError(
            f"cannot rebuild the checkpoint's validation split ({corpus_error}); give a file",
            "--prompts",
        )
    texts = iter_texts(corpus.val_files, corpus.stream_kwargs("val").get("span", FULL_SPAN))
    windows = window_prompts(texts, tokenizer, args.num_prompts or 8, args.prompt_tokens)
    # A window is a fragment; as a prompt it starts as the tokenizer starts a text (a BOS).
    prompts = [tokenizer.added_specials.around(ids) for ids in windows]
    if not prompts:
        raise MultitokenError(
            f"no line of the validation split starts {args.prompt_tokens} tokens of text",
            "--prompt-tokens",
        )
    return prompts, "validation", "--prompt-tokens"


def _validation(model: MTPModel, corpus, config: dict) -> dict:
    """The trunk's loss on a few validation batches in fp32. A τ means little without it: a
    weak trunk's greedy output loops, and heads predict loops well (DESIGN.md §Measured)."""
    from multitoken.packing import validation_batches
    from multitoken.trainer import evaluate

    seq_len, batch = config.get("seq_len", 256), config.get("batch_size", 8)
    batches = validation_batches(corpus, model.tokenizer, seq_len, batch, 4)
    dtype = model.parts.embed.weight.dtype
    try:
        scores = evaluate(model.float(), batches, 1.0, contextlib.nullcontext)
    finally:
        model.to(dtype)
    return {"val_loss": scores["main_loss"], "val_accuracy": scores["main_acc"]}


def _more_heads(model: MTPModel, folders: list[str]) -> dict[str, MTPModel]:
    """Further ``--heads`` on ``model``'s trunk object, labelled by folder name (made unique)."""
    from multitoken.checkpoint import resolve_checkpoint
    from multitoken.headfile import is_heads_folder, load_heads

    labels = [model.family]
    also = {}
    for folder in folders:
        path = Path(folder)
        label = path.name if path.name not in labels else f"{path.name}-{len(labels)}"
        labels.append(label)
        if not is_heads_folder(path):
            path = resolve_checkpoint(path, "--heads")
        also[label] = load_heads(model.trunk, path, "--heads").eval()
    return also


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: every input is checked before any timing; then measure, report."""
    import multitoken
    from multitoken.bench_plot import format_report, plot
    from multitoken.checkpoint import is_run_or_checkpoint, read_meta, resolve_checkpoint
    from multitoken.cli import error_line
    from multitoken.data import Corpus
    from multitoken.fileio import write_json_atomic

    _check_numbers(args)
    json_path, plot_path = _output_path(args.json, "--json"), _output_path(args.plot, "--plot")
    runtime = RuntimeConfig.from_options(args)
    runtime.validate()
    heads = args.heads or [None]
    model = multitoken.load(args.checkpoint, heads=heads[0], flag="--checkpoint")
    if model.heads is None:
        raise MultitokenError(f"{args.checkpoint} has no heads to measure; add --heads", "--heads")
    also = _more_heads(model, heads[1:])
    precision = place_for_decoding(model, runtime.device, runtime.precision)
    for other in also.values():
        place_for_decoding(other, runtime.device, runtime.precision)
    device = model.parts.embed.weight.device
    family, depth = model.family, model.depth
    draft_lens = parse_draft_lens(
        args.draft_lens, family, max(m.depth for m in [model, *also.values()])
    )
    ckpt, meta = Path(args.checkpoint), {"train_config": {}}
    if is_run_or_checkpoint(ckpt):
        ckpt = resolve_checkpoint(ckpt, "--checkpoint")
        meta = read_meta(ckpt)
    vocab = model.trunk.get_output_embeddings().weight.shape[0]
    draft = None if args.draft_model is None else load_draft_model(args.draft_model, vocab)
    config = meta.get("train_config", {})
    corpus, corpus_error = None, None
    try:
        specs = args.data if args.data is not None else config.get("data")
        corpus = Corpus.from_specs(specs or None, config.get("val_fraction", 0.05))
    except MultitokenError as exc:
        corpus_error = error_line(exc)
    prompts, source, flag = _prompts(args, model.tokenizer, corpus, corpus_error)
    longest = max(draft_lens + [args.prompt_lookup, depth])  # auto drafts up to D
    check_fits(model, prompts, args.max_new_tokens, longest, flag)

    kernel = choose_linear_kernel(args.linear_kernel, model)
    print(f"multitoken: {precision.describe()}", file=sys.stderr)  # every input checked
    result: dict = {"checkpoint": str(ckpt), "family": family, "depth": depth}
    result.update(device=str(device), threads=torch.get_num_threads(), cpu=cpu_kind())
    result.update(precision=precision.name, precision_reason=precision.reason)
    result.update(val_loss=None, val_accuracy=None)
    if corpus is not None:
        try:
            result.update(_validation(model, corpus, config))
        except MultitokenError as exc:  # a split too small for a batch: time all the same
            print(f"multitoken: no validation loss: {error_line(exc)}", file=sys.stderr)
    result["prompts"] = {"source": source, "count": len(prompts), "tokens": list(map(len, prompts))}
    result.update(max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    new, lookup, repeats = args.max_new_tokens, args.prompt_lookup, args.repeats
    result.update(
        bench(
            model, prompts, draft_lens, new, draft, lookup, repeats, also=also, linear_kernel=kernel
        )
    )
    print(format_report(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
    if plot_path is not None:
        plot(result, plot_path)
    return 0
