"""Timing one decoding method prompt by prompt, and what its run reports: the method names,
our decoder as a method (:func:`ours`), :class:`Timed` and :func:`measure`, and the figures pooled
over prompts (acceptance, drafting).

Apart from :mod:`multitoken.bench.run`, which chooses the methods, takes them in turns and
compares them, because timing one method is the unit that both it and a caller measuring a
single method (:func:`measure`) use. ``multitoken.bench.run`` names everything here too. (Not
called ``measure``: ``multitoken.bench.measure`` is that function, looked up lazily, and a
submodule of the same name would shadow it.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from multitoken.bench.peers import Decode
from multitoken.decode.api import generate
from multitoken.decode.trees.spec import CHAIN
from multitoken.hardware import sync
from multitoken.model import MTPModel

PLAIN, SPECULATIVE, AUTO, TREE = "plain", "speculative", "auto", "tree"
OURS_SPECULATIVE = (SPECULATIVE, AUTO, TREE)


def outputs_identical(outputs: list[list[int]], reference: list[list[int]]) -> bool:
    """True when every prompt's output equals the reference token for token (same length too)."""
    return len(outputs) == len(reference) and all(
        list(a) == list(b) for a, b in zip(outputs, reference)
    )


def ours(
    model: MTPModel, new: int, K: int | str | None, kernel: str = "torch", tree: str | None = None
) -> Decode:
    """Our decoder for one prompt; ``K`` None is plain decoding (the trunk alone), ``"auto"``
    chooses K before each step; ``kernel``: of the linear layers; ``tree``: verify that tree
    (``--tree``) instead of a chain (None: a chain)."""

    def decode(prompt: list[int]):
        spec = dict(draft_len=K or 1, speculate=K is not None, temperature=0.0)
        spec.update(linear_kernel=kernel, tree=CHAIN if tree is None else tree)
        out = generate(model, [prompt], max_new_tokens=new, eos_id=None, **spec)
        return out.tokens[0], out.stats.trunk_passes, out.stats

    return decode


def pooled_acceptance(stats: list) -> list[float]:
    """a_k over all prompts: summed hits / summed tries. A mean of per-prompt ratios would
    over-weight prompts on which a head was tried only a few times."""
    if not all(hasattr(s, "head_tries") for s in stats):
        return [statistics.fmean(col) for col in zip(*(s.acceptance for s in stats))]
    tries = [sum(col) for col in zip(*(s.head_tries for s in stats))]
    hits = [sum(col) for col in zip(*(s.head_hits for s in stats))]
    return [h / t if t else 0.0 for h, t in zip(hits, tries)]


class Timed:
    """One method's measurements, prompt by prompt: an untimed warm-up on the first prompt, then
    each prompt as the caller asks (so that :func:`~multitoken.bench.run.bench` can take the
    methods in turn on each prompt). Wall time is the median over repeats of the summed
    per-prompt times (only the decode call is timed)."""

    def __init__(self, name: str, K: int | None, decode: Decode, device: torch.device) -> None:
        self.name, self.K, self.decode, self.device = name, K, decode, device
        self.walls: list[float] = []  # per repeat
        self.outputs: list[list[list[int]]] = []  # per repeat, per prompt
        self.passes, self.stats = 0, []  # of the first repeat

    def warm_up(self, prompt: list[int]) -> None:
        self.decode(prompt)

    def run(self, prompt: list[int], repeat: int) -> None:
        """Decode ``prompt`` once as part of repeat ``repeat`` (0, 1, ... in order)."""
        if repeat == len(self.walls):
            self.walls.append(0.0)
            self.outputs.append([])
        sync(self.device)
        start = time.perf_counter()
        tokens, n_passes, st = self.decode(prompt)
        sync(self.device)
        self.walls[repeat] += time.perf_counter() - start
        self.outputs[repeat].append(tokens)
        if repeat == 0:
            self.passes, self.stats = self.passes + n_passes, self.stats + [st]

    def summary(self, reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
        """The run's summary and the first repeat's outputs (compared to ``reference``; with no
        reference, the method is the reference)."""
        reference = self.outputs[0] if reference is None else reference
        tokens, wall = sum(map(len, self.outputs[0])), statistics.median(self.walls)
        passes = self.passes
        run = {
            "method": self.name,
            "draft_len": self.K,
            "tau": tokens / passes if passes else None,
            "acceptance": pooled_acceptance(self.stats) if self.name in OURS_SPECULATIVE else None,
            "trunk_passes": passes,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "speedup_vs_plain": None,  # filled in once every method has run
            "speedup_vs_hf_greedy": None,
            "identical": all(outputs_identical(outs, reference) for outs in self.outputs),
        }
        if self.name in OURS_SPECULATIVE:
            run.update(_drafting(self.stats))
        return run, self.outputs[0]


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
    """One method on its own (:class:`Timed`): a warm-up, then every prompt ``repeats`` times.
    Returns the run's summary and the first repeat's outputs."""
    timed = Timed(name, K, decode, device)
    timed.warm_up(prompts[0])
    for repeat in range(repeats):
        for prompt in prompts:
            timed.run(prompt, repeat)
            tick()
    return timed.summary(reference)


def _drafting(stats: list) -> dict:
    """The K each step drafted and the tokens it verified (pooled over prompts), and the
    heads' time per drafting step."""
    ks = [k for s in stats for k in s.draft_lens]
    nodes = [n for s in stats for n in s.nodes]
    steps = sum(s.draft_steps for s in stats)
    return {
        "draft_len_counts": {str(k): ks.count(k) for k in sorted(set(ks))},
        "mean_draft_len": statistics.fmean(ks) if ks else 0.0,
        "mean_nodes": statistics.fmean(nodes) if nodes else 0.0,
        "draft_ms_per_step": 1e3 * sum(s.draft_s for s in stats) / steps if steps else 0.0,
    }
