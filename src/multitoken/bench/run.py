"""``multitoken bench``'s measuring: is self-speculative decoding faster than the alternatives,
here, really? (The command itself is :mod:`multitoken.cli.bench`; transformers' methods are
:mod:`multitoken.bench.peers`, timing one method :mod:`multitoken.bench.timing`, the table and
figure :mod:`multitoken.bench.plot`.)

A high τ can come with a wall-clock slowdown (drafting costs time, and a verify pass over K+1
tokens costs more than a pass over 1), and a weak trunk that loops inflates τ (docs/design.md
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

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from multitoken.bench.peers import (
    ASSISTED,
    HF_GREEDY,
    PROMPT_LOOKUP,
    Decode,
    baselines,
    load_draft_model,
    transformers_method,
)
from multitoken.bench.timing import (
    AUTO,
    OURS_SPECULATIVE,
    PLAIN,
    SPECULATIVE,
    TREE,
    Timed,
    measure,
    ours,
    outputs_identical,
    pooled_acceptance,
)
from multitoken.config import GenerateConfig
from multitoken.decode.api import check_prompts
from multitoken.decode.costs import remember_cost, verify_cost
from multitoken.decode.kernels import choose_linear_kernel, linear_kernels
from multitoken.decode.trees.budget import AUTO_MAX_DRAFTS
from multitoken.decode.trees.spec import TreeSpec
from multitoken.errors import MultitokenError
from multitoken.hardware import cpu_kind
from multitoken.heads import head_class
from multitoken.model import MTPModel
from multitoken.text.prompts import read_prompt_records

# transformers' methods and the draft model's loader are bench_peers', the method names and the
# timing of one method bench.timing's; named here as well, so that every method name and
# everything ``multitoken bench`` runs is one import away
__all__ = [
    "ASSISTED",
    "AUTO",
    "HF_GREEDY",
    "PLAIN",
    "PROMPT_LOOKUP",
    "SPECULATIVE",
    "bench",
    "check_fits",
    "default_draft_lens",
    "load_draft_model",
    "Timed",
    "measure",
    "ours",
    "outputs_identical",
    "parse_draft_lens",
    "pooled_acceptance",
    "read_prompt_file",
    "repeated_ngram_share",
    "transformers_method",
]


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
    :meth:`multitoken.text.prompts.Prompt.encode`)."""
    return [prompt.encode(tokenizer) for prompt in read_prompt_records(path)]


def check_fits(model: MTPModel, prompts: list[list[int]], new: int, K: int, flag: str) -> None:
    """Fail before any timing if a prompt cannot be decoded: the check ``generate`` makes
    (:func:`multitoken.decode.api.check_prompts`), said of the option the prompts came from."""
    check_prompts(model, prompts, GenerateConfig(max_new_tokens=new), K, flag)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


class Method(NamedTuple):
    """One row of the benchmark: a method, its draft length, its decoder, and whose heads."""

    name: str
    K: int | None
    decode: Decode
    label: str | None  # the heads' label for ours; None for plain decoding and the baselines
    tree: str | None = None  # a tree row's shape, as --tree gives it


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
    trees: list[str] = (),
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

    ``linear_kernel``: what our decoders run the linear layers on (:mod:`multitoken.decode.kernels`;
    c(q) is measured on it too); transformers' methods always run on torch's own.

    ``trees``: shapes (``--tree`` specs) to verify as trees, one row each (``tree``, its spec
    and ``nodes`` per step, with verify_bound = τ / c(nodes)) for heads whose candidates do not
    depend on the drafts before them (bpd, meta).

    ``also``: more heads on the same trunk object (``multitoken.io.headfile.load_heads``), by label.
    The baselines run once; each set of heads gets its speculative and auto rows, and every
    row of ours names its heads (``"heads"``: the label, or ``model``'s family).
    """
    heads = _check_request(model, prompts, draft_lens, max_new_tokens, repeats, prompt_lookup, also)
    depth = max(m.depth for m in heads.values())
    longest = max(draft_lens + [prompt_lookup, depth])  # auto drafts up to D
    check_fits(model, prompts, max_new_tokens, longest, "prompts")
    kernel = choose_linear_kernel(linear_kernel, model)
    passes = [0]  # trunk calls, counted by a hook for transformers' methods
    shapes = {spec: _tree_depth_and_nodes(spec, depth) for spec in trees}
    methods = _ours(model, heads, draft_lens, max_new_tokens, kernel, shapes)
    peers = baselines(model, max_new_tokens, passes, prompt_lookup, draft_model)
    methods += [Method(name, K, decode, None) for name, K, decode in peers]
    # c(q) first, on a machine not yet warmed by decoding; auto K then uses this same curve
    q_max = max(draft_lens + [depth] + [nodes for _, nodes in shapes.values()]) + 1
    with torch.no_grad(), linear_kernels(model, kernel):
        cost = verify_cost(model.trunk, prompts[0], q_max)
        remember_cost(model.trunk, cost)  # keyed by the kernel: auto K finds it
    runs, reference = _measure_all(model, heads, methods, prompts, passes, repeats, progress)
    _add_speedups(runs, cost)
    share = repeated_ngram_share(prompts, reference)
    return {
        "runs": runs,
        "verify_cost": cost,
        "repeated_8gram_share": share,
        **_machine(model, kernel),
    }


def _check_request(model, prompts, draft_lens, new, repeats, prompt_lookup, also) -> dict:
    """Every set of heads by label, once the numbers make sense and they share one trunk."""
    if not prompts or not draft_lens or new < 1 or repeats < 1 or prompt_lookup < 0:
        raise MultitokenError(
            "need prompts, draft lengths, max_new_tokens >= 1, repeats >= 1, prompt_lookup >= 0"
        )
    heads = {model.family: model, **(also or {})}
    if any(m.trunk is not model.trunk for m in heads.values()):
        raise MultitokenError("every set of heads must sit on the same trunk object")
    return heads


def _tree_depth_and_nodes(spec: str, depth: int) -> tuple[int, int]:
    """How deep a --tree spec drafts and the most drafts a step verifies (auto: up to
    :data:`multitoken.decode.trees.budget.AUTO_MAX_DRAFTS` over all ``depth`` heads; dynamic:N,
    N over them)."""
    tree = TreeSpec.parse(spec)
    if tree.auto:
        return depth, AUTO_MAX_DRAFTS
    if tree.static is None:
        return depth, tree.shape.nodes
    return tree.static.max_depth, tree.static.size - 1


def fixed_nodes(spec: str, depth: int) -> int | None:
    """The tokens every step of a --tree row verifies, the pending one included; None where
    the steps choose (``auto``, with lookup or not: their mean is reported instead)."""
    return None if TreeSpec.parse(spec).auto else _tree_depth_and_nodes(spec, depth)[1] + 1


def _ours(
    model: MTPModel,
    heads: dict[str, MTPModel],
    draft_lens: list[int],
    new: int,
    kernel: str,
    trees: dict[str, tuple[int, int]] | None = None,
) -> list[Method]:
    """Plain decoding (the reference, so first), then each set of heads' fixed-K, auto and tree
    rows; a K or a tree past what the heads can draft is left out for them."""
    methods = [Method(PLAIN, None, ours(model, new, None, kernel), None)]
    for label, m in heads.items():
        longest = m.heads.max_draft_len()
        lens = [K for K in draft_lens if longest is None or K <= longest]
        methods += [Method(SPECULATIVE, K, ours(m, new, K, kernel), label) for K in lens]
        methods.append(Method(AUTO, None, ours(m, new, "auto", kernel), label))
        for spec, (tree_depth, _) in (trees or {}).items():
            if TreeSpec.parse(spec).per_row:  # auto, dynamic: as deep as the heads
                tree_depth = m.depth
            if longest is None or tree_depth <= longest:
                decode = ours(m, new, tree_depth, kernel, spec)
                methods.append(Method(TREE, tree_depth, decode, label, spec))
    return methods


def _measure_all(
    model: MTPModel,
    heads: dict[str, MTPModel],
    methods: list[Method],
    prompts: list[list[int]],
    passes: list[int],
    repeats: int,
    progress: bool,
) -> tuple[list[dict], list[list[int]]]:
    """Every method, each checked against the first (plain decoding); returns the runs and
    plain decoding's outputs. The methods take turns on each prompt (plain, then the others, on
    prompt 1; then on prompt 2, ...), each after a warm-up of its own: a machine whose speed
    drifts over minutes (shared cores, clocks) then slows every method alike, where running
    one method's prompts after another's would tilt their ratios (on a 2-core cloud machine
    the same decoding ran 10% apart from one minute to the next)."""
    from tqdm import tqdm

    device = model.parts.embed.weight.device
    vocab = model.trunk.get_output_embeddings().weight.shape[0]
    hook = model.trunk.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    # disable=None: a bar on a terminal only, so logs and pipes stay clean
    bar = tqdm(
        total=len(methods) * (repeats * len(prompts) + 1), disable=None if progress else True
    )
    timed = [Timed(m.name, m.K, m.decode, device) for m in methods]
    try:
        with torch.no_grad():
            for method, t in zip(methods, timed):
                bar.set_description(f"warm-up {_describe(method)}")
                t.warm_up(prompts[0])
                bar.update()
            for repeat in range(repeats):
                for i, prompt in enumerate(prompts):
                    for method, t in zip(methods, timed):
                        bar.set_description(f"prompt {i + 1}/{len(prompts)} {_describe(method)}")
                        t.run(prompt, repeat)
                        bar.update()
    finally:
        bar.close()
        hook.remove()
    runs, reference = [], None
    for method, t in zip(methods, timed):
        run, outputs = t.summary(reference)
        if method.tree is not None:  # auto: as many nodes as its steps chose
            tree = method.tree
            run.update(tree=tree, nodes=fixed_nodes(tree, method.K))
        if method.label is not None:  # which heads, and how many tokens they draft from
            run["heads"] = method.label
            run["draft_vocab"] = heads[method.label].head_config.draft_vocab or vocab
        if reference is None:  # the first method, plain decoding, is the reference
            reference = outputs
        runs.append(run)
    return runs, reference


def _describe(method: Method) -> str:
    what = method.name if method.K is None else f"{method.name} K={method.K}"
    what = what if method.tree is None else f"{method.name} {method.tree}"
    return what if method.label is None else f"{method.label} {what}"


def _machine(model: MTPModel, kernel: str) -> dict:
    """What the figures were measured on: they mean little without it."""
    return {
        "device": str(model.parts.embed.weight.device),
        "cpu": cpu_kind(),
        "threads": torch.get_num_threads(),
        "dtype": str(model.parts.embed.weight.dtype).removeprefix("torch."),
        "linear_kernel": kernel,
    }


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
        if r["method"] == TREE and r["tau"] is not None and r["nodes"]:
            r["verify_bound"] = r["tau"] / c[r["nodes"]]
        if r["method"] == AUTO and r["tau"] is not None:
            counts = {int(k): n for k, n in r["draft_len_counts"].items()}
            mean_c = sum(c[k + 1] * n for k, n in counts.items()) / max(1, sum(counts.values()))
            r["verify_bound"] = r["tau"] / mean_c
