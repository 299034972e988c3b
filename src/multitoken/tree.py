"""Tree drafting: verify many candidate continuations in one trunk pass.

A draft tree is rooted at the row's pending token t_n (already the trunk's choice); a node at
depth j is a candidate for t_{n+j} and its parent is the candidate before it (docs/design.md
§Inference, "Tree verification"). One trunk forward over every node, each at position
start + depth and attending to the cache, its ancestors and itself only
(:func:`tree_attention_mask`), gives the trunk's distribution after every node; the acceptance
rules then keep one root-to-node path:

- greedy (:func:`accept_greedy_tree`): the deepest path whose every token is its parent's argmax;
- sampled (:func:`accept_sampled_tree`): SpecInfer's multi-candidate speculative sampling (Miao
  et al. 2024, §4.2) with draws without replacement as in EAGLE-2 (Li et al. 2024) and Recursive
  Speculative Decoding (Jeon et al. 2024), exactly lossless.

Shapes are static (Medusa, Cai et al. 2024: :meth:`Tree.parse`, :meth:`Tree.from_paths`) or grown
per step from the draft's confidence (EAGLE-2: :mod:`multitoken.tree_dynamic`). A chain is the tree with one
child per node, so these rules reduce to multitoken.sampling's on ``Tree.chain(K)``.

Conventions: nodes in breadth-first order, node 0 the root, ``parent[i] < i``; siblings are
numbered in rank order (rank 0 = the parent's most likely candidate).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from multitoken.errors import MultitokenError
from multitoken.kvcache import position_mask

AUTO = "auto"  # --tree auto: each step's tree chosen by the costs (multitoken.tree_auto)
CHAIN = "chain"  # --tree chain: one chain of drafts a step, K from --draft-len
MAX_NODES = 256  # one trunk pass verifies them all; wider trees cost more than they gain
DYNAMIC = "dynamic:"  # --tree dynamic:N: each row's own tree of N drafts a step
# --tree dynamic:N+lookup[:L], auto+lookup[:L]: prompt lookup's continuation, up to L tokens,
# grafted into each row's tree (multitoken.tree_lookup)
LOOKUP = "+lookup"
DEFAULT_LOOKUP = 8
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


@dataclass(frozen=True)
class Dynamic:
    """``--tree dynamic:N``: every step, each row verifies its own N drafts, those with the
    largest product of draft probabilities along their path (EAGLE-2's rule, Li et al. 2024;
    :func:`multitoken.tree_dynamic.prune_tree`); a :class:`multitoken.tree_dynamic.Sizer`."""

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


# The trees of a batch: one for every row (a static tree), or one per row, all of N nodes
# (per-row dynamic trees, :func:`prune_tree`).
Trees = Tree | Sequence[Tree]


def _per_row(trees: Trees, batch: int, build, device) -> torch.Tensor:
    """``build(tree)`` for every row's tree, stacked into [B, ...] on ``device``."""
    if isinstance(trees, Tree):
        one = build(trees).to(device)
        return one.expand(batch, *one.shape)
    return torch.stack([build(tree) for tree in trees]).to(device)


@functools.cache  # trees recur step after step; the tensors are only read
def _depths(tree: Tree) -> torch.Tensor:
    return torch.tensor(tree.depth)


@functools.cache
def _parents(tree: Tree) -> torch.Tensor:
    return torch.tensor(tree.parent).clamp_min(0)  # the root: its own, unused


def _max_depth(trees: Trees) -> int:
    return trees.max_depth if isinstance(trees, Tree) else max(t.max_depth for t in trees)


def _size(trees: Trees) -> int:
    size = trees.size if isinstance(trees, Tree) else trees[0].size
    if not isinstance(trees, Tree) and any(t.size != size for t in trees):
        raise ValueError("the trees of one batch need one node count")
    return size


def _row_tree(trees: Trees, b: int) -> Tree:
    return trees if isinstance(trees, Tree) else trees[b]


def _positive(text: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise _bad(f"tree {spec!r}: {text!r} is not a positive integer; {SPEC_HELP}")
    return int(text)


def tree_positions(start: torch.Tensor, trees: Trees) -> torch.Tensor:
    """[B, N] position of every node: start[b] (the pending token's position) + its depth."""
    depth = _per_row(trees, start.size(0), _depths, start.device)
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
    sees the cache as :func:`multitoken.kvcache.position_mask` has it and, among the new slots,
    exactly itself and its ancestors (SpecInfer's topology-aware causal mask, Miao et al. 2024
    §4.1). ``window``: transformers' sliding window, q_pos - k_pos < window, on both parts.
    ``trees``: one tree for every row, or each row's own."""
    B = start.size(0)
    cached = position_mask(key_positions, tree_positions(start, trees), window, dtype)
    seen = _per_row(trees, B, Tree.ancestors, start.device)  # [B, N, N]
    if window is not None:
        depth = _per_row(trees, B, _depths, start.device)
        seen = seen & (depth[:, :, None] - depth[:, None, :] < window)  # positions: by depths
    new = torch.zeros(seen.shape, dtype=dtype, device=start.device)
    new.masked_fill_(~seen, torch.finfo(dtype).min)
    return torch.cat([cached, new[:, None]], dim=-1)


def accept_greedy_tree(
    trees: Trees, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tree verification (Medusa; SpecInfer): tokens [B, N] the node tokens (the root's
    is the pending token), target [B, N] the trunk's argmax after each node -> (path, bonus).

    Row b keeps the deepest node whose every ancestor's token (and its own) equals its parent's
    target; equal depths go to the lowest node index (so of two siblings with one token, the
    first). path[b]: the kept nodes from the root; bonus [B]: the trunk's token after the last.
    ``trees``: one tree for every row, or each row's own. One host sync, for the paths."""
    B, N = tokens.shape
    device = tokens.device
    parent = _per_row(trees, B, _parents, device)  # [B, N]
    match = tokens == target.gather(1, parent)  # [B, N]: node i is its parent's argmax
    reach = match.clone()
    reach[:, 0] = True
    for _ in range(_max_depth(trees) - 1):  # after d rounds, depths up to d + 1 are settled
        reach = match & reach.gather(1, parent)
        reach[:, 0] = True
    depth = _per_row(trees, B, _depths, device)
    order = torch.arange(N, device=device)
    key = torch.where(reach, depth * N + (N - 1 - order), -1)  # deepest, then lowest index
    last = key.argmax(dim=1)  # [B]
    bonus = target.gather(1, last[:, None]).squeeze(1)
    return [_row_tree(trees, b).path(node) for b, node in enumerate(last.tolist())], bonus


def sample_candidates(q: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k distinct tokens [..., k] from probabilities q [..., V], distributed as k successive
    draws without replacement, in draw order (Gumbel-top-k, Kool et al. 2019): the candidates
    :func:`accept_sampled_tree` expects when given q. Past q's support, the extra picks are
    tokens q cannot draw, which acceptance skips."""
    u = torch.rand(q.shape, generator=generator, device=q.device).clamp_min(1e-30)
    keys = q.log() - torch.log(-torch.log(u))  # log q + Gumbel noise; log 0 = -inf sorts last
    return keys.topk(k, dim=-1).indices


def _residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)), each row [.., V]; where it is empty (p == q, so the rejection had
    probability zero) p is kept."""
    rest = (target - draft).clamp_min(0.0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(1e-30), target)


def _without(draft: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """q with ``token`` [B] taken out and renormalised: the law of the next draw without
    replacement (all zeros once q's support is used up)."""
    rest = draft.scatter(1, token[:, None], 0.0)
    return rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)


def accept_sampled_tree(
    trees: Trees,
    tokens: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Lossless multi-candidate speculative sampling (SpecInfer, Miao et al. 2024, §4.2; the
    recursive rejection of EAGLE-2, Li et al. 2024, and of Jeon et al. 2024 for draws without
    replacement): tokens [B, N], p [B, N, V] the trunk's distribution after each node (after
    temperature, top-k, top-p), q [B, N, V] the draft distribution node i's children were drawn
    from without replacement in rank order (:func:`sample_candidates`), or None when they were
    chosen deterministically (top-k): q is then the point mass on each candidate in turn.

    From the root, with p' = p at the node and q' = q at the node: accept child c with
    probability min(1, p'(c) / q'(c)) and restart at c; on rejection p' <- norm(max(p' - q', 0))
    and q' <- q' without c, then the next sibling. With no child accepted (or at a leaf) the
    next token is drawn from p'. By induction over the candidates, what is emitted is
    distributed exactly as the trunk's own samples. Children q' cannot draw are skipped.
    ``trees``: one tree for every row, or each row's own.
    -> (path [B] lists of nodes from the root, next [B]); vectorised over rows, one host sync."""
    B, _, V = p.shape
    rows = torch.arange(B, device=p.device)
    one = [trees] if isinstance(trees, Tree) else trees
    width = max(max(1, *(len(c) for c in t.children)) for t in one)
    kids = _per_row(trees, B, lambda t: t.child_table(width=width), p.device)  # [B, N, W]
    node = torch.zeros(B, dtype=torch.long, device=p.device)
    walking = torch.ones(B, dtype=torch.bool, device=p.device)
    target, draft = p[:, 0], None if q is None else q[:, 0]  # p', q' [B, V]
    taken = torch.full((B, _max_depth(trees)), -1, dtype=torch.long, device=p.device)
    for d in range(_max_depth(trees)):
        searching = walking.clone()  # rows at a node whose children are still being tried
        for r in range(width):
            child = kids[rows, node, r]  # [B], -1 past the node's last child
            token = tokens[rows, child.clamp_min(0)]
            offer = torch.nn.functional.one_hot(token, V).to(p.dtype) if draft is None else draft
            pt = target.gather(1, token[:, None]).squeeze(1)
            qt = offer.gather(1, token[:, None]).squeeze(1)
            tried = searching & (child >= 0) & (qt > 0)
            u = torch.rand(B, generator=generator, device=p.device)
            accept = tried & (u * qt < pt)  # u < p'(c) / q'(c), without dividing
            reject = (tried & ~accept)[:, None]
            target = torch.where(reject, _residual(target, offer), target)
            if draft is not None:
                draft = torch.where(reject, _without(draft, token), draft)
            taken[:, d] = torch.where(accept, child, taken[:, d])
            searching &= ~accept
        walking &= ~searching  # a row whose children were all rejected samples from p'
        node = torch.where(walking, taken[:, d], node)
        target = torch.where(walking[:, None], p[rows, node], target)
        if q is not None:
            draft = torch.where(walking[:, None], q[rows, node], draft)
    nxt = torch.multinomial(target, 1, generator=generator).squeeze(1)
    return [[0] + [i for i in row if i >= 0] for row in taken.tolist()], nxt
