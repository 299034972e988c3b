"""The ``--tree`` grammar: what a value asks for, parsed in one place.

``chain`` (no tree), a static shape (``3,2,1``, ``chain:4``), ``dynamic:N`` (each row's own tree of
N drafts, EAGLE-2), ``auto`` (each row's tree sized by the costs), and ``+lookup[:L]`` after a
per-row tree (prompt lookup's continuation joins each row's tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitoken.decode.trees.shape import MAX_NODES, SPEC_HELP, Tree, _bad, _positive

AUTO = "auto"  # --tree auto: each step's tree chosen by the costs (multitoken.decode.trees.budget)
CHAIN = "chain"  # --tree chain: one chain of drafts a step, K from --draft-len
DYNAMIC = "dynamic:"  # --tree dynamic:N: each row's own tree of N drafts a step
# --tree dynamic:N+lookup[:L], auto+lookup[:L]: prompt lookup's continuation, up to L tokens,
# grafted into each row's tree (multitoken.decode.trees.lookup)
LOOKUP = "+lookup"
DEFAULT_LOOKUP = 8


@dataclass(frozen=True)
class Dynamic:
    """``--tree dynamic:N``: every step, each row verifies its own N drafts, those with the
    largest product of draft probabilities along their path (EAGLE-2's rule, Li et al. 2024;
    :func:`multitoken.decode.trees.dynamic.prune_tree`); a :class:`multitoken.decode.trees.dynamic.Sizer`."""

    nodes: int

    def drafts(self) -> bool:
        return True

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        return scores  # the draft probabilities at their word

    def budget(self, values: torch.Tensor) -> int:
        return self.nodes

    def observe(
        self, scores: torch.Tensor, kept: torch.Tensor, trees: list[Tree], paths: list[list[int]]
    ) -> None:
        pass  # a fixed budget learns nothing


def parse_spec(spec: str) -> Tree | Dynamic | str:
    """A ``--tree`` value's shape: a static :class:`Tree`, a :class:`Dynamic` budget,
    :data:`AUTO` (its lookup part: :func:`lookup_len`) or :data:`CHAIN` (no tree)."""
    text, lookup = _split_lookup(spec)
    if text == CHAIN and not lookup:
        return CHAIN
    if lookup and text != AUTO and not text.startswith(DYNAMIC):
        raise _bad(
            f"tree {spec!r}: prompt lookup joins per-row trees only, as in "
            f"'dynamic:8{LOOKUP}' or '{AUTO}{LOOKUP}'"
        )
    if text == AUTO:
        return AUTO
    if text.startswith(DYNAMIC):
        nodes = _positive(text[len(DYNAMIC) :], spec)
        if nodes >= MAX_NODES:
            raise _bad(f"a tree of {nodes} drafts is over the limit of {MAX_NODES - 1}")
        return Dynamic(nodes)
    return Tree.parse(spec)


def lookup_len(spec: str) -> int:
    """The most prompt-lookup tokens a ``--tree`` value grafts into each row's tree (0: none)."""
    return _split_lookup(spec)[1]


def _split_lookup(spec: str) -> tuple[str, int]:
    """``"auto+lookup:6"`` -> ("auto", 6); ``"auto+lookup"`` -> ("auto", DEFAULT_LOOKUP)."""
    text = spec.replace(" ", "")
    base, plus, tail = text.partition(LOOKUP)
    if not plus:
        return text, 0
    if not tail:
        return base, DEFAULT_LOOKUP
    if not tail.startswith(":"):
        raise _bad(f"tree {spec!r}: expected {LOOKUP} or {LOOKUP}:L; {SPEC_HELP}")
    length = _positive(tail[1:], spec)
    if length >= MAX_NODES:
        raise _bad(f"a lookup of {length} tokens is over the limit of {MAX_NODES - 1}")
    return base, length
