"""``multitoken bench``: is self-speculative decoding faster than the alternatives, here, really?

shared/DESIGN.md (§Figures the product reports, §Measured) asks for more than τ: a high τ can come
with a wall-clock slowdown (drafting costs time, a verify pass over K+1 tokens costs more than one
over 1 token), and a weak trunk that loops inflates τ. So every method decodes the same prompts,
greedily, one prompt at a time, exactly ``max_new_tokens`` tokens each (EOS never stops anyone),
and is checked token for token against our plain decoding:

    plain           ours, the trunk alone (the reference output)
    speculative     ours, self-speculative with K drafts, for each K
    hf_greedy       ``model.trunk.generate`` greedy: the baseline a user would otherwise run
    prompt_lookup   ``generate(prompt_lookup_num_tokens=N)``: speculation with no model at all
    assisted        ``generate(assistant_model=...)`` with a separate small draft model

Beside them: the verify-cost curve c(q) = time(trunk pass over q new tokens) / time(1 token),
which bounds the speedup at τ / c(K+1), and the trunk's validation loss, without which τ cannot
be read. Every τ here is measured on the trunk's own greedy output, not on validation text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from multitoken.errors import MultitokenError
from multitoken.generate import generate
from multitoken.model import MTPModel

PLAIN, SPECULATIVE = "plain", "speculative"
HF_GREEDY, PROMPT_LOOKUP, ASSISTED = "hf_greedy", "prompt_lookup", "assisted"
VERIFY_REPEATS = 7
MAX_PROMPT_SOURCE_CHARS = 4 << 20  # read at most this much validation text to pick prompts

# One decoded prompt: (new tokens, trunk passes, our Stats or None for transformers' methods).
Decoded = tuple[list[int], int, object]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def default_draft_lens(family: str, depth: int) -> list[int]:
    """1..D; DeepSeek modules can also draft past D (the last one recurs), so add D+2."""
    lens = list(range(1, depth + 1))
    return lens + [depth + 2] if family == "deepseek" else lens


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
    if not lens:
        raise MultitokenError("no draft length given", "--draft-lens")
    if lens[0] < 1:
        raise MultitokenError(f"draft lengths must be >= 1, got {lens[0]}", "--draft-lens")
    if family != "deepseek" and lens[-1] > depth:
        raise MultitokenError(
            f"{family} heads draft at most D = {depth} tokens; got {lens[-1]}", "--draft-lens"
        )
    return lens


def read_prompt_file(path: str | Path, tokenizer) -> list[list[int]]:
    """One prompt per non-blank line, or per ``"text"`` field of a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise MultitokenError(f"no such file: {path}", "--prompts")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MultitokenError(
                    f"{path}:{number}: not JSON ({exc.msg})", "--prompts"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MultitokenError(f'{path}:{number}: no "text" string field', "--prompts")
            line = record["text"]
        texts.append(line)
    prompts = [ids for ids in map(tokenizer.encode, texts) if ids]
    if not prompts:
        raise MultitokenError(f"{path} holds no prompt", "--prompts")
    return prompts


def validation_prompts(texts: Iterator[str], tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, each starting at a line, spread evenly over the text.

    Prompts from held-out text keep the measurement honest (DESIGN.md §Measured): the trunk has
    not memorised them, and a window of mostly whitespace would make the continuation trivial.
    """
    pieces, read = [], 0
    for text in texts:
        pieces.append(text)
        read += len(text)
        if read >= MAX_PROMPT_SOURCE_CHARS:
            break
    starts = [(i, m.start()) for i, t in enumerate(pieces) for m in re.finditer(r"^.*\S", t, re.M)]
    prompts: list[list[int]] = []
    used: set[int] = set()
    for j in range(count):
        first = j * len(starts) // count
        for k in range(first, first + min(len(starts), 1000)):
            k %= len(starts)
            if k in used:
                continue
            used.add(k)
            piece, at = starts[k]
            ids = tokenizer.encode(pieces[piece][at : at + 16 * length])[:length]
            text = tokenizer.decode(ids)
            if len(ids) == length and sum(c.isspace() for c in text) <= len(text) / 2:
                prompts.append(ids)
                break
    return prompts


def load_draft_model(path: str | Path, vocab_size: int) -> PreTrainedModel:
    """A transformers causal-LM folder, or a multitoken checkpoint/run folder (its trunk)."""
    from multitoken.checkpoint import resolve_checkpoint
    from multitoken.trunk import load_trunk

    folder = Path(path)
    try:
        if (folder / "multitoken.json").is_file() or (folder / "latest").is_file():
            folder = resolve_checkpoint(folder, "--draft-model") / "trunk"
        draft = load_trunk(folder)
    except MultitokenError as exc:
        raise MultitokenError(str(exc).removeprefix(f"{exc.flag}: "), "--draft-model") from None
    theirs = draft.get_output_embeddings().weight.shape[0]
    if theirs != vocab_size:
        raise MultitokenError(
            f"the draft model's vocabulary has {theirs} tokens, the trunk's {vocab_size}: "
            "assisted generation needs the same tokenizer",
            "--draft-model",
        )
    return draft.eval()


def check_fits(model: MTPModel, prompts: list[list[int]], new: int, K: int, flag: str) -> None:
    """Fail before any timing if a prompt plus its continuation overflows the context window."""
    limit = getattr(model.trunk.config, "max_position_embeddings", None)
    longest = max(map(len, prompts))
    if limit and longest + new + K + 1 > limit:
        raise MultitokenError(
            f"a prompt of {longest} tokens + {new} new tokens + {K + 1} verified exceeds the "
            f"trunk's context window of {limit}",
            flag,
        )


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Assisted generation warns on every call about its own internal arguments; hide that."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class PassCounter:
    """Counts forward calls of a module: trunk passes of methods that report none themselves."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._hook = module.register_forward_pre_hook(self._seen)

    def _seen(self, _module, _args) -> None:
        self.count += 1

    def close(self) -> None:
        self._hook.remove()


def outputs_identical(outputs: list[list[int]], reference: list[list[int]]) -> bool:
    """True when every prompt's output equals the reference token for token (same length too)."""
    return len(outputs) == len(reference) and all(
        list(a) == list(b) for a, b in zip(outputs, reference)
    )


def ours(model: MTPModel, new: int, K: int | None) -> Callable[[list[int]], Decoded]:
    """Our decoder for one prompt; ``K`` None means plain decoding (the trunk alone)."""

    def decode(prompt: list[int]) -> Decoded:
        out = generate(
            model,
            [prompt],
            max_new_tokens=new,
            draft_len=K or 1,
            speculate=K is not None,
            temperature=0.0,
            eos_id=None,
        )
        return out.tokens[0], out.stats.trunk_passes, out.stats

    return decode


def transformers_method(
    model: MTPModel, new: int, counter: PassCounter, **options
) -> Callable[[list[int]], Decoded]:
    """``model.trunk.generate`` greedy for one prompt. ``eos_token_id=None`` (rather than
    ``min_new_tokens``, which would mask EOS and so change the output) keeps it going."""
    device = model.parts.embed.weight.device

    def decode(prompt: list[int]) -> Decoded:
        ids = torch.tensor([prompt], device=device)
        counter.count = 0
        with _quiet_transformers():
            out = model.trunk.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                eos_token_id=None,
                **options,
            )
        return out[0, ids.shape[1] :].tolist(), counter.count, None

    return decode


def _pooled_acceptance(stats: list) -> list[float]:
    """a_k over all prompts: summed hits / summed tries (a mean of per-prompt ratios would
    over-weight prompts where a head was tried only a few times)."""
    if all(hasattr(s, "head_tries") and hasattr(s, "head_hits") for s in stats):
        n = max(len(s.head_tries) for s in stats)
        tries = [sum(s.head_tries[k] for s in stats if k < len(s.head_tries)) for k in range(n)]
        hits = [sum(s.head_hits[k] for s in stats if k < len(s.head_hits)) for k in range(n)]
        return [h / t if t else 0.0 for h, t in zip(hits, tries)]
    return [statistics.fmean(col) for col in zip(*(s.acceptance for s in stats))]


def measure(
    decode: Callable[[list[int]], Decoded],
    prompts: list[list[int]],
    repeats: int,
    device: torch.device,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    """Decode every prompt ``repeats`` times after one untimed warm-up; wall time is the median
    over repeats of the summed per-prompt times (only the decode call is inside the timer)."""
    decode(prompts[0])
    walls, outputs, passes, stats = [], [], 0, []
    for repeat in range(repeats):
        wall = 0.0
        for prompt in prompts:
            _sync(device)
            start = time.perf_counter()
            tokens, n_passes, st = decode(prompt)
            _sync(device)
            wall += time.perf_counter() - start
            outputs.append(tokens)
            if repeat == 0:
                passes += n_passes
                stats.append(st)
            tick()
        walls.append(wall)
    return {
        "outputs": outputs,
        "wall_s": statistics.median(walls),
        "passes": passes,
        "stats": stats,
    }


@torch.no_grad()
def verify_cost(
    model: MTPModel, prompt: list[int], q_max: int, repeats: int = VERIFY_REPEATS
) -> dict:
    """c(q) for q = 1..q_max: one trunk pass over q new tokens on a cache holding ``prompt``,
    relative to q = 1. The q's are interleaved within each repeat so that drift (other load,
    clock changes) hits all of them alike; the cache is cropped back after every pass."""
    trunk = model.trunk
    device = model.parts.embed.weight.device
    cache = DynamicCache(config=trunk.config)
    trunk(input_ids=torch.tensor([prompt], device=device), cache=cache, use_cache=True)
    tiled = (prompt * (q_max // len(prompt) + 1))[:q_max]
    inputs = {q: torch.tensor([tiled[:q]], device=device) for q in range(1, q_max + 1)}
    samples: dict[int, list[float]] = {q: [] for q in inputs}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for q, ids in inputs.items():
            _sync(device)
            start = time.perf_counter()
            trunk(input_ids=ids, cache=cache, use_cache=True)
            _sync(device)
            if repeat:
                samples[q].append(time.perf_counter() - start)
            cache.crop(-q)
    t1 = statistics.median(samples[1])
    return {
        "q": list(inputs),
        "c": [statistics.median(samples[q]) / t1 for q in inputs],
        "t1_s": t1,
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
) -> dict:
    """Run every method on ``prompts`` and return ``{"runs": [...], "verify_cost": {...}}``.

    Each run is a dict with method, draft_len, tau, acceptance, trunk_passes, tokens, wall_s,
    tokens_per_s, speedup_vs_plain, speedup_vs_hf_greedy, identical (and, for speculative runs,
    verify_bound = τ / c(K+1), the speedup drafting for free would give).
    ``prompt_lookup`` 0 skips prompt-lookup decoding; ``draft_model`` None skips assisted.
    """
    from tqdm import tqdm

    if not prompts or not draft_lens:
        raise MultitokenError("need at least one prompt and one draft length", "prompts")
    if max_new_tokens < 1 or repeats < 1 or prompt_lookup < 0:
        raise MultitokenError(
            "max_new_tokens and repeats must be >= 1, prompt_lookup >= 0", "max_new_tokens"
        )
    check_fits(model, prompts, max_new_tokens, max(draft_lens + [prompt_lookup]), "prompts")
    device = model.parts.embed.weight.device
    counter = PassCounter(model.trunk)
    methods: list[tuple[str, int | None, Callable[[list[int]], Decoded]]] = [
        (PLAIN, None, ours(model, max_new_tokens, None))
    ]
    methods += [(SPECULATIVE, K, ours(model, max_new_tokens, K)) for K in draft_lens]
    methods.append((HF_GREEDY, None, transformers_method(model, max_new_tokens, counter)))
    if prompt_lookup:
        lookup = transformers_method(
            model, max_new_tokens, counter, prompt_lookup_num_tokens=prompt_lookup
        )
        methods.append((PROMPT_LOOKUP, prompt_lookup, lookup))
    if draft_model is not None:
        assisted = transformers_method(
            model, max_new_tokens, counter, assistant_model=draft_model.to(device)
        )
        methods.append((ASSISTED, None, assisted))

    runs, reference = [], None
    # disable=None: a bar on a terminal only, so logs and pipes stay clean
    bar = tqdm(total=len(methods) * repeats * len(prompts), disable=None if progress else True)
    try:
        with torch.no_grad():
            for name, K, decode in methods:
                bar.set_description(f"{name}{'' if K is None else f' K={K}'}")
                got = measure(decode, prompts, repeats, device, lambda: bar.update(1))
                if reference is None:  # the first method is plain decoding
                    reference = got["outputs"][: len(prompts)]
                runs.append(_summarise(name, K, got, prompts, reference))
            cost = verify_cost(model, prompts[0], max(draft_lens) + 1)
    finally:
        bar.close()
        counter.close()
    _add_speedups(runs, cost)
    return {"runs": runs, "verify_cost": cost}


def _summarise(name: str, K: int | None, got: dict, prompts: list, reference: list) -> dict:
    outputs = got["outputs"]
    per_repeat = [outputs[i : i + len(prompts)] for i in range(0, len(outputs), len(prompts))]
    tokens = sum(map(len, per_repeat[0]))
    ours_stats = [s for s in got["stats"] if s is not None]
    return {
        "method": name,
        "draft_len": K,
        "tau": tokens / got["passes"] if got["passes"] else None,
        "acceptance": _pooled_acceptance(ours_stats) if name == SPECULATIVE else None,
        "trunk_passes": got["passes"],
        "tokens": tokens,
        "wall_s": got["wall_s"],
        "tokens_per_s": tokens / got["wall_s"] if got["wall_s"] > 0 else 0.0,
        "speedup_vs_plain": None,  # filled in by _add_speedups once every method has run
        "speedup_vs_hf_greedy": None,
        "identical": all(outputs_identical(outs, reference) for outs in per_repeat),
    }


def _add_speedups(runs: list[dict], cost: dict) -> None:
    """Speedups are tokens/s ratios; every method emitted the same number of tokens."""
    base = {r["method"]: r["tokens_per_s"] for r in runs if r["method"] in (PLAIN, HF_GREEDY)}
    c = dict(zip(cost["q"], cost["c"]))
    for r in runs:
        for key, method in (("speedup_vs_plain", PLAIN), ("speedup_vs_hf_greedy", HF_GREEDY)):
            r[key] = r["tokens_per_s"] / base[method] if base.get(method) else None
        if r["method"] == SPECULATIVE and r["tau"] is not None:
            r["verify_bound"] = r["tau"] / c[r["draft_len"] + 1]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(result: dict) -> str:
    """The table a person reads: one row per method, then c(q) and the validation loss."""
    header = ["method", "K", "tau", "a_1..a_K", "tok/s", "x plain", "x hf", "identical"]
    rows = [header]
    for r in result["runs"]:
        acc = "/".join(f"{a:.2f}" for a in r["acceptance"]) if r["acceptance"] else "-"
        rows.append(
            [
                r["method"],
                "-" if r["draft_len"] is None else str(r["draft_len"]),
                _num(r["tau"]),
                acc,
                _num(r["tokens_per_s"], ".1f"),
                _num(r["speedup_vs_plain"]),
                _num(r["speedup_vs_hf_greedy"]),
                "yes" if r["identical"] else "NO",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    cost = result["verify_cost"]
    curve = "  ".join(f"c({q})={c:.2f}" for q, c in zip(cost["q"], cost["c"]))
    lines.append(f"verify cost: {curve}  (t1 = {cost['t1_s'] * 1e3:.2f} ms)")
    loss = result.get("val_loss")
    lines.append(
        "trunk validation loss: "
        + ("unavailable" if loss is None else f"{loss:.4f} (accuracy {result['val_accuracy']:.3f})")
        + "; tau is measured on the trunk's own greedy output"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Add ``bench`` to the CLI's subcommands (the subparsers' own parser class is used)."""
    p = subparsers.add_parser(
        "bench",
        help="measure decoding speed: ours (plain, speculative) vs transformers' methods",
        description="Decode the same prompts greedily with every method, check the outputs are "
        "identical, and report tau, per-head acceptance, tokens/s and speedups, the verify-cost "
        "curve c(q) and the trunk's validation loss.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    p.add_argument("--draft-lens", help="K values, e.g. 1,2,4 (default: 1..D; deepseek adds D+2)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line, or .jsonl with text")
    p.add_argument(
        "--num-prompts",
        type=int,
        help="prompts to use (default: 8 from the validation split; all lines of --prompts)",
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="validation prompt length (default: 64)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (default: 64)")
    p.add_argument("--draft-model", metavar="DIR", help="small model for assisted generation")
    p.add_argument(
        "--prompt-lookup", type=int, default=3, help="prompt-lookup tokens, 0: off (default: 3)"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed passes per method (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: acceptance and speedup vs K")


def _positive(args: argparse.Namespace, name: str, minimum: int = 1) -> None:
    value = getattr(args, name)
    if value is not None and value < minimum:
        raise MultitokenError(f"must be >= {minimum}, got {value}", "--" + name.replace("_", "-"))


def _output_path(value: str | None, flag: str) -> Path | None:
    """Check an output path before minutes of measuring, not after."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir() or not path.parent.is_dir():
        raise MultitokenError(f"cannot write {path}: not a file in an existing folder", flag)
    return path


def _validation(model: MTPModel, corpus, config: dict) -> dict:
    """The trunk's loss on a few validation batches, in fp32 (DESIGN.md §Measured: a τ is only
    meaningful next to how good the trunk is; a weak trunk's loops inflate it)."""
    from multitoken.data import validation_batches
    from multitoken.trainer import evaluate

    batches = validation_batches(
        corpus,
        model.tokenizer,
        config.get("seq_len", 256),
        config.get("batch_size", 8),
        min(4, max(1, config.get("eval_batches", 4))),
    )
    dtype = model.parts.embed.weight.dtype
    try:
        scores = evaluate(model.float(), batches, 1.0, contextlib.nullcontext)
    finally:
        model.to(dtype)
    return {"val_loss": scores["main_loss"], "val_accuracy": scores["main_acc"]}


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: gather inputs (all checks before any timing), measure, report."""
    import multitoken
    from multitoken.checkpoint import read_meta, resolve_checkpoint, write_json_atomic
    from multitoken.data import Corpus, iter_texts

    for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "repeats"):
        _positive(args, name)
    _positive(args, "prompt_lookup", 0)
    json_path, plot_path = _output_path(args.json, "--json"), _output_path(args.plot, "--plot")
    ckpt = resolve_checkpoint(args.checkpoint, "--checkpoint")
    meta = read_meta(ckpt)
    family, depth = meta["heads"]["family"], meta["heads"]["depth"]
    draft_lens = parse_draft_lens(args.draft_lens, family, depth)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise MultitokenError(str(exc), "--device") from None
    model = multitoken.load(ckpt, flag="--checkpoint").to(device)
    tokenizer = model.tokenizer
    draft = (
        None if args.draft_model is None else load_draft_model(args.draft_model, model_vocab(model))
    )

    config = meta.get("train_config", {})
    corpus, corpus_error = None, None
    try:
        corpus = Corpus.from_specs(config.get("data") or None, config.get("val_fraction", 0.05))
    except MultitokenError as exc:
        corpus_error = str(exc)
    if args.prompts is not None:
        prompts, source, flag = (
            read_prompt_file(args.prompts, tokenizer),
            str(args.prompts),
            "--prompts",
        )
    elif corpus is None:
        raise MultitokenError(
            f"cannot rebuild the checkpoint's validation split ({corpus_error}); pass a file",
            "--prompts",
        )
    else:
        texts = iter_texts(corpus.val_files, corpus.stream_kwargs("val").get("span", (0.0, 1.0)))
        prompts = validation_prompts(texts, tokenizer, args.num_prompts or 8, args.prompt_tokens)
        source, flag = "validation", "--prompt-tokens"
        if not prompts:
            raise MultitokenError(
                f"no line of the validation split starts {args.prompt_tokens} tokens of text",
                "--prompt-tokens",
            )
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    check_fits(model, prompts, args.max_new_tokens, max(draft_lens + [args.prompt_lookup]), flag)

    result: dict = {
        "checkpoint": str(ckpt),
        "family": family,
        "depth": depth,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "val_loss": None,
        "val_accuracy": None,
    }
    if corpus is not None:
        try:
            result.update(_validation(model, corpus, config))
        except MultitokenError as exc:  # a too-small split: report the timing all the same
            print(f"multitoken: no validation loss: {exc}", file=sys.stderr)
    result["prompts"] = {"source": source, "count": len(prompts), "tokens": list(map(len, prompts))}
    result["max_new_tokens"] = args.max_new_tokens
    result["repeats"] = args.repeats
    result.update(
        bench(
            model,
            prompts,
            draft_lens,
            args.max_new_tokens,
            draft_model=draft,
            prompt_lookup=args.prompt_lookup,
            repeats=args.repeats,
        )
    )
    print(format_report(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
    if plot_path is not None:
        from multitoken.bench_plot import plot

        plot(result, plot_path)
    return 0


def model_vocab(model: MTPModel) -> int:
    return model.trunk.get_output_embeddings().weight.shape[0]
