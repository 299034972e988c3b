"""The ``--tree`` grammar: what a value asks for, parsed in one place.

``chain`` (no tree), a static shape (``3,2,1``, ``chain:4``), ``dynamic:N`` (each row's own tree of
N drafts, EAGLE-2), ``auto`` (each row's tree sized by the costs), and ``+lookup[:L]`` after a
per-row tree (prompt lookup's continuation joins each row's tree).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from multitoken.decode.trees.shape import MAX_NODES, SPEC_HELP, Tree, _bad, _positive

AUTO = "auto"  # --tree auto: each step's tree chosen by the costs (multitoken.decode.trees.budget)
CHAIN = "chain"  # --tree chain: one chain of drafts a step, K from --draft-len
DYNAMIC = "dynamic:"  # --tree dynamic:N: each row's own tree of N drafts a step
# --tree dynamic:N+lookup[:L], auto+lookup[:L]: prompt lookup's continuation, up to L tokens,
# merged into each row's tree (multitoken.decode.trees.lookup)
LOOKUP = "+lookup"
DEFAULT_LOOKUP = 8


@dataclass(frozen=True)
class Dynamic:
    """``--tree dynamic:N``: every step, each row verifies its own N drafts, those with the
    largest product of draft probabilities along their path (EAGLE-2's rule, Li et al. 2024;
    :func:`multitoken.decode.trees.dynamic.keep_best`); a
    :class:`multitoken.decode.trees.dynamic.NodeBudget`."""

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

    def observe_step(self, tokens: float, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class TreeSpec:
    """A ``--tree`` value, parsed once (:meth:`parse` keeps each value's parse) into what a step
    verifies: ``shape`` a static :class:`Tree`, a :class:`Dynamic` budget, :data:`AUTO` or
    :data:`CHAIN` (no tree); ``lookup`` the most prompt-lookup tokens merged into each row's
    tree (0: none). ``generate``, the bench and the config all read this object."""

    text: str
    shape: Tree | Dynamic | str
    lookup: int

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def parse(text: str) -> TreeSpec:
        base, lookup = _split_lookup(text)
        if base == CHAIN and not lookup:
            return TreeSpec(text, CHAIN, 0)
        if lookup and base != AUTO and not base.startswith(DYNAMIC):
            raise _bad(
                f"tree {text!r}: prompt lookup joins per-row trees only, as in "
                f"'dynamic:8{LOOKUP}' or '{AUTO}{LOOKUP}'"
            )
        if base == AUTO:
            return TreeSpec(text, AUTO, lookup)
        if base.startswith(DYNAMIC):
            nodes = _positive(base[len(DYNAMIC) :], text)
            if nodes >= MAX_NODES:
                raise _bad(f"a tree of {nodes} drafts is over the limit of {MAX_NODES - 1}")
            return TreeSpec(text, Dynamic(nodes), lookup)
        return TreeSpec(text, Tree.parse(text), 0)

    @property
    def chain(self) -> bool:
        return self.shape == CHAIN

    @property
    def auto(self) -> bool:
        return self.shape == AUTO

    @property
    def static(self) -> Tree | None:
        return self.shape if isinstance(self.shape, Tree) else None

    @property
    def per_row(self) -> bool:
        """Each row's own tree every step (``dynamic:N``, ``auto``): as deep as the heads draft."""
        return self.auto or isinstance(self.shape, Dynamic)


def parse_spec(spec: str) -> Tree | Dynamic | str:
    """A ``--tree`` value's shape (:attr:`TreeSpec.shape`)."""
    return TreeSpec.parse(spec).shape


def lookup_len(spec: str) -> int:
    """The most prompt-lookup tokens a ``--tree`` value merges into each row's tree (0: none)."""
    return TreeSpec.parse(spec).lookup


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
