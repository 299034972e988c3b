"""Draft trees: many candidate continuations verified in one trunk pass.

:mod:`~multitoken.decode.trees.shape` (a tree, its positions and attention mask),
:mod:`~multitoken.decode.trees.spec` (the ``--tree`` grammar), :mod:`~multitoken.decode.trees.accept`
(which path a row keeps), :mod:`~multitoken.decode.trees.dynamic` (EAGLE-2's per-row trees),
:mod:`~multitoken.decode.trees.budget` (how many nodes pay), :mod:`~multitoken.decode.trees.lookup`
(prompt lookup joined into the trees) and :mod:`~multitoken.decode.trees.step` (one tree step).
The names below are the leaf modules' public ones (``multitoken.tree`` before issue 20).
"""

from multitoken.decode.trees.accept import (
    accept_greedy_tree,
    accept_sampled_tree,
    sample_candidates,
)
from multitoken.decode.trees.shape import (
    MAX_NODES,
    SPEC_HELP,
    Tree,
    Trees,
    tree_attention_mask,
    tree_positions,
)
from multitoken.decode.trees.spec import (
    AUTO,
    CHAIN,
    DEFAULT_LOOKUP,
    DYNAMIC,
    LOOKUP,
    Dynamic,
    lookup_len,
    parse_spec,
)

__all__ = [
    "AUTO",
    "CHAIN",
    "DEFAULT_LOOKUP",
    "DYNAMIC",
    "LOOKUP",
    "MAX_NODES",
    "SPEC_HELP",
    "Dynamic",
    "Tree",
    "Trees",
    "accept_greedy_tree",
    "accept_sampled_tree",
    "lookup_len",
    "parse_spec",
    "sample_candidates",
    "tree_attention_mask",
    "tree_positions",
]
