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
per step from the draft's confidence (EAGLE-2: :func:`dynamic_tree`). A chain is the tree with one
child per node, so these rules reduce to multitoken.sampling's on ``Tree.chain(K)``.

Conventions: nodes in breadth-first order, node 0 the root, ``parent[i] < i``; siblings are
numbered in rank order (rank 0 = the parent's most likely candidate).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property

import torch

from multitoken.errors import MultitokenError
from multitoken.kvcache import position_mask

AUTO = "auto"  # --tree auto: each step's tree chosen by the costs (multitoken.tree_auto)
MAX_NODES = 256  # one trunk pass verifies them all; wider trees cost more than they gain
SPEC_HELP = "e.g. '3,2,1' (top-3, each with top-2 children, each with one) or 'chain:4'"


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
        """[N, N] bool: (i, j) is True iff j is i or one of its ancestors (root included)."""
        seen = torch.eye(self.size, dtype=torch.bool)
        for i in range(1, self.size):
            seen[i] |= seen[self.parent[i]]  # the parent's row is final: parent < i
        return seen

    def child_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[N, W] long: node i's children in rank order, padded with -1 (W: the widest node)."""
        width = max(1, *(len(c) for c in self.children))
        table = [list(c) + [-1] * (width - len(c)) for c in self.children]
        return torch.tensor(table, dtype=torch.long, device=device)


def _positive(text: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise _bad(f"tree {spec!r}: {text!r} is not a positive integer; {SPEC_HELP}")
    return int(text)


def tree_positions(start: torch.Tensor, tree: Tree) -> torch.Tensor:
    """[B, N] position of every node: start[b] (the pending token's position) + its depth."""
    depth = torch.tensor(tree.depth, dtype=start.dtype, device=start.device)
    return start[:, None] + depth[None, :]


def tree_attention_mask(
    key_positions: torch.Tensor,
    start: torch.Tensor,
    tree: Tree,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """Additive mask [B, 1, N, S + N] for a trunk forward of the N nodes over a cache whose slot
    s holds position ``key_positions[b, s]`` (-1: a hole): node i, at ``start[b] + depth[i]``,
    sees the cache as :func:`multitoken.kvcache.position_mask` has it and, among the new slots,
    exactly itself and its ancestors (SpecInfer's topology-aware causal mask, Miao et al. 2024
    §4.1). ``window``: transformers' sliding window, q_pos - k_pos < window, on both parts."""
    B, N = start.size(0), tree.size
    cached = position_mask(key_positions, tree_positions(start, tree), window, dtype)
    seen = tree.ancestors().to(start.device)  # [N, N]
    if window is not None:
        depth = torch.tensor(tree.depth, device=start.device)
        seen &= depth[:, None] - depth[None, :] < window  # positions differ by depths here
    new = torch.zeros(N, N, dtype=dtype, device=start.device)
    new.masked_fill_(~seen, torch.finfo(dtype).min)
    return torch.cat([cached, new.expand(B, 1, N, N)], dim=-1)


def accept_greedy_tree(
    tree: Tree, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tree verification (Medusa; SpecInfer): tokens [B, N] the node tokens (the root's
    is the pending token), target [B, N] the trunk's argmax after each node -> (path, bonus).

    Row b keeps the deepest node whose every ancestor's token (and its own) equals its parent's
    target; equal depths go to the lowest node index (so of two siblings with one token, the
    first). path[b]: the kept nodes from the root; bonus [B]: the trunk's token after the last.
    One host sync, for the paths."""
    B, N = tokens.shape
    device = tokens.device
    parent = torch.tensor(tree.parent, device=device).clamp_min(0)  # root: its own, unused
    match = tokens == target[:, parent]  # [B, N]: node i is its parent's argmax
    reach = torch.ones(B, N, dtype=torch.bool, device=device)
    depth = torch.tensor(tree.depth, device=device)
    for d in range(1, tree.max_depth + 1):  # a level's parents are settled before it
        level = [i for i in range(N) if tree.depth[i] == d]  # from the host: no device sync
        up = [tree.parent[i] for i in level]
        reach[:, level] = match[:, level] & reach[:, up]
    order = torch.arange(N, device=device)
    key = torch.where(reach, depth * N + (N - 1 - order), -1)  # deepest, then lowest index
    last = key.argmax(dim=1)  # [B]
    bonus = target.gather(1, last[:, None]).squeeze(1)
    return [tree.path(node) for node in last.tolist()], bonus


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
    tree: Tree,
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
    -> (path [B] lists of nodes from the root, next [B]); vectorised over rows, one host sync."""
    B, _, V = p.shape
    rows = torch.arange(B, device=p.device)
    kids = tree.child_table(p.device)  # [N, W]
    node = torch.zeros(B, dtype=torch.long, device=p.device)
    walking = torch.ones(B, dtype=torch.bool, device=p.device)
    target, draft = p[:, 0], None if q is None else q[:, 0]  # p', q' [B, V]
    taken = torch.full((B, tree.max_depth), -1, dtype=torch.long, device=p.device)
    for d in range(tree.max_depth):
        searching = walking.clone()  # rows at a node whose children are still being tried
        for r in range(kids.size(1)):
            child = kids[node, r]  # [B], -1 past the node's last child
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


def dynamic_tree(scores: torch.Tensor, budget: int) -> Tree:
    """EAGLE-2's dynamic draft tree (Li et al. 2024, §4) for heads whose depth-d candidates do not
    depend on the parent (BPD/Medusa, Meta's parallel heads): scores [D, k] the log-probabilities
    of each depth's top-k candidates, best first. A node is a tuple of ranks (r_1, .., r_d) with
    value sum_j scores[j - 1, r_j] (the log of the product of its path's draft probabilities, an
    estimate of its acceptance); the tree is the ``budget`` best non-root nodes.

    Best-first search: a node is offered once its parent (rank 0) or its next-better sibling is
    taken, both worth at least as much, so nodes leave the heap best first and every prefix of
    the order is a tree with its lower-ranked siblings present. Ties: shallower, then by ranks."""
    if budget < 0:
        raise _bad(f"a tree budget of {budget} nodes: need 0 or more")
    table = scores.tolist()  # [D][k], the one host sync
    if any(row != sorted(row, reverse=True) for row in table):
        raise ValueError("dynamic_tree needs each depth's scores best first (top-k order)")

    def value(path: tuple[int, ...]) -> float:
        return sum(table[j][r] for j, r in enumerate(path))  # summed afresh: no drift

    heap = [(-value((0,)), 1, (0,))] if table and table[0] else []
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < min(budget, MAX_NODES - 1):
        _, _, path = heapq.heappop(heap)
        chosen.append(path)
        offers = [(*path, 0)] if len(path) < len(table) else []
        if path[-1] + 1 < len(table[0]):
            offers.append((*path[:-1], path[-1] + 1))
        for offer in offers:
            heapq.heappush(heap, (-value(offer), len(offer), offer))
    return Tree.from_paths(chosen)
