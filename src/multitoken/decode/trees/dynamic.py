"""Dynamic draft trees (EAGLE-2, Li et al. 2024): a tree grown from the draft's own confidence.

The value of a node is the product of the draft probabilities along its path from the root, an
estimate of the chance that the trunk accepts the whole path; since each factor is at most one,
values only shrink going down, so the best tree of n nodes is simply the n nodes of largest
value (EAGLE-2 §4.2, "reranking"). Every family drafts a :func:`skeleton` (the top candidates
under every node; DeepSeek's depend on their parent, so its skeleton is drafted along the
causal chain) and each row keeps its own best nodes of it (:func:`keep_best` of :func:`path_values`): N of them for
``--tree dynamic:N``, or as many as the cost curve says pay for ``--tree auto``
(:mod:`multitoken.decode.trees.budget`).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from multitoken.decode.trees.shape import MAX_NODES, Tree

# Candidates per node at depths 1, 2, 3, ... of the skeleton a per-row dynamic tree is cut from
# (EAGLE-2 expands the top 8-10; at the budgets a CPU affords, 4 at the first depth suffice)
SKELETON_WIDTHS = (4, 3, 2)
LEAST_SCORE = -1e30  # log of a zero draft probability, kept finite so that paths sum


def skeleton(depth: int) -> Tree:
    """The full product tree a step drafts before each row keeps its best nodes: widths
    :data:`SKELETON_WIDTHS` (the last repeated) down to ``depth``, the deepest narrowed first
    to fit :data:`multitoken.decode.trees.shape.MAX_NODES`."""
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


def path_values(skeleton: Tree, scores: torch.Tensor) -> torch.Tensor:
    """[B, N] each node's value: the log of the product of the draft probabilities along its
    path, ``scores`` [B, N] the log
    draft probability of every node's token under its parent (the root's value is 0)."""
    return path_sums(skeleton, node_log_chances(skeleton, scores))


def node_log_chances(skeleton: Tree, scores: torch.Tensor) -> torch.Tensor:
    """[B, N] each node's own term of its value (its log chance of acceptance given its parent
    accepted), from ``scores`` [B, N] (log probabilities).

    A kept node brings its parent, and its lower-ranked siblings (for sampled candidates the
    siblings are successive draws, and multi-candidate rejection must try a prefix of them):
    a node's own score is taken as the least over its elder siblings and itself, so that values
    never grow with rank or depth."""
    elders, _ = _path_tables(skeleton, str(scores.device))
    s = scores.float().clamp_min(LEAST_SCORE)  # a zero probability: finite, for the sums
    s = s[:, elders].amin(-1)  # [B, N, W] -> [B, N]: each node's least over its elders
    s[:, 0] = 0.0
    return s


def path_sums(skeleton: Tree, chances: torch.Tensor) -> torch.Tensor:
    """[B, N] the sum of ``chances`` [B, N] (:func:`node_log_chances`) along each node's path,
    in place."""
    _, levels = _path_tables(skeleton, str(chances.device))
    # level by level, the parent's sum + the node's own: a node never rounds above its parent
    # or an elder sibling
    for nodes, parents in levels:
        chances[:, nodes] += chances[:, parents]
    return chances


def keep_best(skeleton: Tree, values: torch.Tensor, budget: int) -> tuple[list[Tree], torch.Tensor]:
    """Each row's ``budget`` nodes of largest ``values`` [B, N] (:func:`path_values`), equal
    values going to the lower index (parents and elders first)."""
    kept = best_nodes(values, budget)
    return [_subtree(skeleton, tuple(row)) for row in kept.tolist()], kept


def best_nodes(values: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, budget + 1] the root and each row's ``budget`` nodes of largest ``values`` [B, N],
    equal values going to the lower index, in index order. Values that never grow from a node
    to its children make the kept nodes closed under parents, when parents come first."""
    B, N = values.shape
    budget = min(budget, N - 1)
    best = torch.sort(-values[:, 1:], dim=1, stable=True).indices[:, :budget] + 1  # [B, budget]
    return torch.sort(torch.cat([best.new_zeros(B, 1), best], dim=1), dim=1).values


class NodeBudget(Protocol):
    """Which nodes each row keeps of a drafted skeleton: :class:`multitoken.decode.trees.shape.Dynamic` (its
    N best by draft probability) or :class:`multitoken.decode.trees.budget.TreeBudget` (by calibrated
    probability, as many as the costs say pay)."""

    def drafts(self) -> bool:
        """Whether this step drafts at all (False: a plain step); called once a step."""
        ...

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        """Each node's log chance of acceptance [B, N], from its log draft probability."""
        ...

    def budget(self, values: torch.Tensor) -> int:
        """The nodes each row keeps this step, given every node's :func:`path_values`."""
        ...

    def observe(
        self, scores: torch.Tensor, kept: torch.Tensor, trees: list[Tree], paths: list[list[int]]
    ) -> None:
        """What the step drafted (``scores``), kept (``kept`` [B, n + 1] skeleton nodes, as
        ``trees``) and accepted (``paths``, node indices into each row's tree)."""
        ...

    def observe_step(self, tokens: float, seconds: float) -> None:
        """The whole step (drafting or plain) took ``seconds`` and gave ``tokens`` per row."""
        ...


@functools.cache
def _path_tables(skeleton: Tree, device: str) -> tuple[torch.Tensor, list]:
    """[N, W] each node's elder siblings and itself (padded with itself), and for each depth
    >= 1 its nodes (a slice: breadth-first order) and their parents."""
    width = max(len(c) for c in skeleton.children)
    elders = [
        [*skeleton.children[skeleton.parent[i]][: skeleton.rank[i]], i] if i else [0]
        for i in range(skeleton.size)
    ]
    table = torch.tensor([row + [row[-1]] * (width - len(row)) for row in elders])
    levels = [
        (slice(lv.start, lv.stop), torch.tensor([skeleton.parent[i] for i in lv], device=device))
        for lv in skeleton.levels[1:]
    ]
    return table.to(device), levels


@functools.lru_cache(maxsize=4096)
def _subtree(skeleton: Tree, kept: tuple[int, ...]) -> Tree:
    """The tree of the skeleton nodes ``kept`` (sorted, closed under parents); shapes recur
    from step to step, and a cached tree keeps its masks' index tensors."""
    where = {node: i for i, node in enumerate(kept)}
    return Tree((-1, *(where[skeleton.parent[node]] for node in kept[1:])))
