"""Dynamic draft trees (EAGLE-2, Li et al. 2024): a tree grown from the draft's own confidence.

The value of a node is the product of the draft probabilities along its path from the root, an
estimate of the chance that the trunk accepts the whole path; since each factor is at most one,
values only shrink going down, so the best tree of n nodes is simply the n nodes of largest
value (EAGLE-2 §4.2, "reranking"). Two forms:

- :func:`dynamic_tree`: over a table of each depth's top-k log-probabilities, for heads whose
  candidates at depth d are the same under every parent (bpd, meta) — used by ``--tree auto``
  over estimated acceptances (:mod:`multitoken.tree_auto`);
- :func:`prune_tree`: per row, over the nodes of a drafted :func:`skeleton` with each node's
  own draft log-probability — ``--tree dynamic:N``, for every family (DeepSeek's candidates
  depend on their parent; the skeleton is drafted along its causal chain).
"""

from __future__ import annotations

import functools
import heapq

import torch

from multitoken.tree import MAX_NODES, Tree, _bad

# Candidates per node at depths 1, 2, 3, ... of the skeleton a per-row dynamic tree is cut from
# (EAGLE-2 expands the top 8-10; at the budgets a CPU affords, 4 at the first depth suffice)
SKELETON_WIDTHS = (4, 3, 2)


def skeleton(depth: int) -> Tree:
    """The full product tree a step drafts before each row keeps its best nodes: widths
    :data:`SKELETON_WIDTHS` (the last repeated) down to ``depth``, the deepest narrowed first
    to fit :data:`multitoken.tree.MAX_NODES`."""
    widths = [SKELETON_WIDTHS[min(d, len(SKELETON_WIDTHS) - 1)] for d in range(depth)]

    def size() -> int:
        count = level = 1
        for w in widths:
            level *= w
            count += level
        return count

    while size() > MAX_NODES:
        widths[max(d for d, w in enumerate(widths) if w > 1)] -= 1
    return Tree.parse(",".join(map(str, widths)))


def prune_tree(
    skeleton: Tree, scores: torch.Tensor, budget: int
) -> tuple[list[Tree], torch.Tensor]:
    """Each row's ``budget`` best nodes of ``skeleton`` (plus the root): scores [B, N] the log
    draft probability of every node's token under its parent (the root's is ignored). Returns
    each row's tree and the skeleton nodes it keeps, [B, budget + 1] in breadth-first order.

    A kept node brings its parent, and its lower-ranked siblings (for sampled candidates the
    siblings are successive draws, and multi-candidate rejection must try a prefix of them):
    a node's score is taken as the least over its elder siblings and itself, so that values
    never grow with rank, and equal values go to the lower index (parents and elders first)."""
    B, N = scores.shape
    budget = min(budget, N - 1)
    s = scores.float().clone()
    s[:, 0] = 0.0
    by_rank, by_level = _index_lists(skeleton)
    for nodes, elder in by_rank:
        s[:, nodes] = torch.minimum(s[:, nodes], s[:, elder])
    value = s
    for level, up in by_level:
        value[:, level] = value[:, level] + value[:, up]
    best = torch.sort(-value[:, 1:], dim=1, stable=True).indices[:, :budget] + 1  # [B, budget]
    kept = torch.sort(torch.cat([best.new_zeros(B, 1), best], dim=1), dim=1).values
    return [_subtree(skeleton, tuple(row)) for row in kept.tolist()], kept


@functools.cache
def _index_lists(skeleton: Tree) -> tuple[list, list]:
    """For each rank r >= 1: its nodes and their next-elder siblings; for each depth >= 1: its
    nodes and their parents."""
    N = skeleton.size
    by_rank = []
    for r in range(1, max(len(c) for c in skeleton.children)):
        nodes = [i for i in range(1, N) if skeleton.rank[i] == r]
        by_rank.append((nodes, [skeleton.children[skeleton.parent[i]][r - 1] for i in nodes]))
    by_level = [(list(lv), [skeleton.parent[i] for i in lv]) for lv in skeleton.levels[1:]]
    return by_rank, by_level


@functools.lru_cache(maxsize=4096)
def _subtree(skeleton: Tree, kept: tuple[int, ...]) -> Tree:
    """The tree of the skeleton nodes ``kept`` (sorted, closed under parents); shapes recur
    from step to step, and a cached tree keeps its masks' index tensors."""
    where = {node: i for i, node in enumerate(kept)}
    return Tree((-1, *(where[skeleton.parent[node]] for node in kept[1:])))


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
