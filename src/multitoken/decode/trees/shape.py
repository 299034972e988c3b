"""A draft tree's shape, and the positions and attention mask of one trunk pass over it.

A draft tree is rooted at the row's pending token t_n (already the trunk's choice); a node at
depth j is a candidate for t_{n+j} and its parent is the candidate before it (docs/design.md
§Inference, "Tree verification"). One trunk forward over every node, each at position
start + depth and attending to the cache, its ancestors and itself only
(:func:`tree_attention_mask`), gives the trunk's distribution after every node;
:mod:`multitoken.decode.trees.accept` then keeps one root-to-node path.

Shapes are static (Medusa, Cai et al. 2024: :meth:`Tree.parse`, :meth:`Tree.from_paths`) or grown
per step from the draft's confidence (EAGLE-2: :mod:`multitoken.decode.trees.dynamic`). A chain is
the tree with one child per node.

Conventions: nodes in breadth-first order, node 0 the root, ``parent[i] < i``; siblings are
numbered in rank order (rank 0 = the parent's most likely candidate).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from multitoken.decode.kvcache import position_mask
from multitoken.errors import MultitokenError

MAX_NODES = 256  # one trunk pass verifies them all; wider trees cost more than they gain
SPEC_HELP = (
    "e.g. '3,2,1' (top-3, each with top-2 children, each with one), 'chain:4', 'dynamic:16', "
    "'auto', 'auto+lookup' or 'chain'"
)


def _bad(message: str) -> MultitokenError:
    return MultitokenError(message, "--tree")


@dataclass(frozen=True)
class Tree:
    """A draft tree's shape: ``parent[i]`` for every node (the root's is -1)."""

    parent: tuple[int, ...]
    depth: tuple[int, ...] = field(init=False, repr=False, compare=False)
    rank: tuple[int, ...] = field(init=False, repr=False, compare=False)
    children: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parent = tuple(int(x) for x in self.parent)
        if not parent or parent[0] != -1:
            raise _bad("a tree's node 0 is its root, with parent -1")
        if len(parent) > MAX_NODES:
            raise _bad(f"a tree of {len(parent)} nodes is over the limit of {MAX_NODES}")
        depth, rank, children = [0], [0], [[] for _ in parent]
        for i, up in enumerate(parent[1:], start=1):
            if not 0 <= up < i:
                raise _bad(f"node {i}'s parent {up} is not an earlier node")
            depth.append(depth[up] + 1)
            if depth[i] < depth[i - 1]:
                raise _bad(f"node {i} breaks breadth-first order (depth {depth[i]} after deeper)")
            rank.append(len(children[up]))
            children[up].append(i)
        object.__setattr__(self, "parent", parent)
        object.__setattr__(self, "depth", tuple(depth))
        object.__setattr__(self, "rank", tuple(rank))
        object.__setattr__(self, "children", tuple(tuple(c) for c in children))

    @property
    def size(self) -> int:
        """N, the number of nodes, root included."""
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    @classmethod
    def chain(cls, k: int) -> Tree:
        """K drafts one after the other (N = K + 1): plain speculative decoding."""
        if not 0 <= k < MAX_NODES:
            raise _bad(f"a chain of {k} drafts: need 0 to {MAX_NODES - 1}")
        return cls((-1, *range(k)))

    @classmethod
    def parse(cls, spec: str) -> Tree:
        """A static shape from text: ``"3,2,1"`` is the full product tree (Medusa's dense
        trees, Cai et al. 2024) with the top-3 candidates at depth 1, the top-2 under each of
        them and the top-1 under each of those; ``"chain:4"`` is :meth:`chain` (4)."""
        text = spec.replace(" ", "")
        if text.startswith("chain:"):
            return cls.chain(_positive(text[len("chain:") :], spec))
        widths = [_positive(part, spec) for part in text.split(",")]
        parent, level = [-1], [0]
        for width in widths:
            if len(parent) + len(level) * width > MAX_NODES:
                raise _bad(f"tree {spec!r} has over {MAX_NODES} nodes")
            start = len(parent)
            parent += [up for up in level for _ in range(width)]
            level = list(range(start, len(parent)))
        return cls(tuple(parent))

    @classmethod
    def from_paths(cls, paths: list[tuple[int, ...]]) -> Tree:
        """Medusa's "choices": each node is the tuple of sibling ranks on its way from the
        root, e.g. (0,), (1,), (0, 0), (0, 1), (0, 0, 0). A path needs its parent and its
        lower-ranked siblings, so that a node's rank is its candidate's rank."""
        paths = [tuple(int(r) for r in path) for path in paths]
        known = set(paths)
        if len(known) != len(paths):
            raise _bad("a tree path is listed twice")
        for path in paths:
            if not path or min(path) < 0:
                raise _bad(f"tree path {path} is not a non-empty tuple of ranks >= 0")
            up, last = path[:-1], path[-1]
            if up and up not in known:
                raise _bad(f"tree path {path} lacks its parent {up}")
            if last and (*up, last - 1) not in known:
                raise _bad(f"tree path {path} lacks its lower-ranked sibling {(*up, last - 1)}")
        # by depth, then lexicographically: breadth-first, siblings together in rank order
        order = sorted(paths, key=lambda path: (len(path), path))
        index = {(): 0} | {path: i + 1 for i, path in enumerate(order)}
        return cls((-1, *(index[path[:-1]] for path in order)))

    @cached_property
    def levels(self) -> tuple[range, ...]:
        """The nodes of each depth 0..D, as index ranges (breadth-first order keeps them
        contiguous)."""
        bounds = [self.depth.index(d) for d in range(self.max_depth + 1)] + [self.size]
        return tuple(range(a, b) for a, b in zip(bounds, bounds[1:]))

    @cached_property
    def widths(self) -> tuple[int, ...]:
        """How many candidates each depth 1..D takes from under one parent: its largest rank
        plus one."""
        widths = [0] * self.max_depth
        for depth, rank in zip(self.depth[1:], self.rank[1:]):
            widths[depth - 1] = max(widths[depth - 1], rank + 1)
        return tuple(widths)

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to ``node``, both included."""
        out = [node]
        while out[-1] > 0:
            out.append(self.parent[out[-1]])
        return out[::-1]

    def ancestors(self) -> torch.Tensor:
        """[N, N] bool: (i, j) is True iff j is i or one of its ancestors (root included).
        Built once per tree: callers must not write into it."""
        return self._ancestors

    @cached_property
    def _ancestors(self) -> torch.Tensor:
        seen = torch.eye(self.size, dtype=torch.bool)
        for i in range(1, self.size):
            seen[i] |= seen[self.parent[i]]  # the parent's row is final: parent < i
        return seen

    def child_table(
        self, device: torch.device | str | None = None, width: int | None = None
    ) -> torch.Tensor:
        """[N, W] long: node i's children in rank order, padded with -1 (W: ``width``, or the
        widest node's)."""
        width = width or max(1, *(len(c) for c in self.children))
        table = [list(c) + [-1] * (width - len(c)) for c in self.children]
        return torch.tensor(table, dtype=torch.long, device=device)


# The trees of a batch: each row's (rows may share one tree object: a static shape), or one
# tree standing for every row
Trees = Tree | Sequence[Tree]


def _per_row(trees: Trees, build, device, batch: int) -> torch.Tensor:
    """``build(tree)`` for each of the ``batch`` rows' trees, stacked into [B, ...] on
    ``device``."""
    rows = [trees] * batch if isinstance(trees, Tree) else trees
    first = rows[0]
    if all(tree is first for tree in rows):  # one shape for the batch: built once
        one = build(first).to(device)
        return one.expand(len(rows), *one.shape)
    return torch.stack([build(tree) for tree in rows]).to(device)


@functools.cache  # trees recur step after step; the tensors are only read
def _depths(tree: Tree) -> torch.Tensor:
    return torch.tensor(tree.depth)


@functools.cache
def _parents(tree: Tree) -> torch.Tensor:
    return torch.tensor(tree.parent).clamp_min(0)  # the root: its own, unused


def _max_depth(trees: Trees) -> int:
    return trees.max_depth if isinstance(trees, Tree) else max(t.max_depth for t in trees)


def _positive(text: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise _bad(f"tree {spec!r}: {text!r} is not a positive integer; {SPEC_HELP}")
    return int(text)


def tree_positions(start: torch.Tensor, trees: Trees) -> torch.Tensor:
    """[B, N] position of every node: start[b] (the pending token's position) + its depth."""
    depth = _per_row(trees, _depths, start.device, start.size(0))
    return start[:, None] + depth.to(start.dtype)


def tree_attention_mask(
    key_positions: torch.Tensor,
    start: torch.Tensor,
    trees: Trees,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """Additive mask [B, 1, N, S + N] for a trunk forward of the N nodes over a cache whose slot
    s holds position ``key_positions[b, s]`` (-1: a hole): node i, at ``start[b] + depth[i]``,
    sees the cache as :func:`multitoken.decode.kvcache.position_mask` has it and, among the new slots,
    exactly itself and its ancestors (SpecInfer's topology-aware causal mask, Miao et al. 2024
    §4.1). ``window``: transformers' sliding window, q_pos - k_pos < window, on both parts.
    ``trees``: each row's (all of N nodes), or one for every row."""
    cached = position_mask(key_positions, tree_positions(start, trees), window, dtype)
    seen = _per_row(trees, Tree.ancestors, start.device, start.size(0))  # [B, N, N]
    if window is not None:
        depth = _per_row(trees, _depths, start.device, start.size(0))
        seen = seen & (depth[:, :, None] - depth[:, None, :] < window)  # positions: by depths
    new = torch.zeros(seen.shape, dtype=dtype, device=start.device)
    new.masked_fill_(~seen, torch.finfo(dtype).min)
    return torch.cat([cached, new[:, None]], dim=-1)
