"""``--tree auto``: the tree each step verifies, sized by the measured cost curve.

Parent-free heads (bpd, meta) propose, for the d-th token after the pending one, candidates in
rank order, the same under every parent. Let a(d, r) = P(the rank-r candidate at depth d is the
trunk's token | the kept path reached depth d - 1), estimated live like
:class:`multitoken.costs.Acceptance` (a prior, decay, one standard error of optimism). Siblings
are distinct tokens, so at most one of them matches, and a node whose path has ranks
r_1..r_d is kept with probability Π_i a(i, r_i). Hence

    E[tokens | T] = 1 + Σ_{nodes of T} Π_{i ≤ depth} a(i, r_i)

and, since these products only shrink along a path, the best tree of n nodes holds the n
largest products: EAGLE-2's growth rule (Li et al. 2024; :func:`multitoken.tree.dynamic_tree`)
over the estimates. Each step takes the n that maximises E[tokens | T_n] / (c(n + 1) + d(D))
with c(q) the measured verify cost and d(D) the heads' drafting cost (:mod:`multitoken.costs`):
n = 0 is a plain step, and a chain is the tree with one candidate per depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from multitoken.costs import CostModel
from multitoken.tree import Tree
from multitoken.tree_dynamic import dynamic_tree

WIDTH = 4  # candidates per depth a tree may take
MAX_NODES = 32  # the most drafts one step verifies


@dataclass
class RankAcceptance:
    """Running estimates of a(d, r), d = 1..depth, r = 0..width-1: hits over offers, with a
    prior of ``prior`` / (r + 1) worth ``weight`` offers, every count decaying by ``decay`` a
    step (recent steps count most; what is no longer offered drifts back to its prior)."""

    depth: int
    width: int = WIDTH
    prior: float = 0.6
    weight: float = 2.0
    decay: float = 0.98
    hits: list[list[float]] = field(default_factory=list)
    offers: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = self.hits or [[0.0] * self.width for _ in range(self.depth)]
        self.offers = self.offers or [[0.0] * self.width for _ in range(self.depth)]

    def observe(self, trees: list[Tree], paths: list[list[int]]) -> None:
        """One step: each row's tree and kept path (node indices from the root). Under the
        path's last node (and every node before it) the candidates it had were offered."""
        for table in (self.hits, self.offers):
            for row in table:
                row[:] = [x * self.decay for x in row]
        for tree, path in zip(trees, paths):
            for node in path:
                for child in tree.children[node]:  # offered where the path went through
                    d, r = tree.depth[child] - 1, tree.rank[child]
                    self.offers[d][r] += 1.0
                    self.hits[d][r] += float(child in path)

    @property
    def optimistic(self) -> list[list[float]]:
        """Each estimate plus one standard error (UCB, as ``Acceptance.optimistic``), made
        non-increasing in rank: the heads rank their candidates."""
        out = []
        for hits, offers in zip(self.hits, self.offers):
            row, ceiling = [], 1.0
            for r, (h, n) in enumerate(zip(hits, offers)):
                a = (h + self.prior / (r + 1) * self.weight) / (n + self.weight)
                a = min(1.0, a + math.sqrt(a * (1 - a) / (n + self.weight)))
                ceiling = min(ceiling, a)
                row.append(ceiling)
            out.append(row)
        return out


def best_tree(a: list[list[float]], costs: CostModel, draft_tokens: int, max_nodes: int) -> Tree:
    """The tree of at most ``max_nodes`` drafts with the most expected tokens per unit of time
    under acceptances ``a`` [depth][width] (see the module docstring)."""
    scores = torch.tensor(a).clamp_min(1e-9).log()  # [D, k], best first in every row
    grown = dynamic_tree(scores, max_nodes)
    products = sorted((_product(grown, node, a) for node in range(1, grown.size)), reverse=True)
    best_n, best_rate, expected = 0, 1.0 / costs.verify(1), 1.0
    for n, p in enumerate(products, start=1):
        expected += p
        rate = expected / (costs.verify(n + 1) + costs.draft(draft_tokens))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return dynamic_tree(scores, best_n)


def _product(tree: Tree, node: int, a: list[list[float]]) -> float:
    """Π a(depth, rank) along the path to ``node``: the chance it is kept."""
    p = 1.0
    for i in tree.path(node)[1:]:
        p *= a[tree.depth[i] - 1][tree.rank[i]]
    return p


@dataclass
class TreeChoice:
    """Chooses each step's tree for ``--tree auto`` from ``costs`` and the acceptance seen so
    far in this call; D = ``depth`` heads draft every step that drafts at all."""

    depth: int
    costs: CostModel
    max_nodes: int = MAX_NODES
    acceptance: RankAcceptance = field(init=False)

    def __post_init__(self) -> None:
        self.acceptance = RankAcceptance(self.depth)

    def choose(self) -> Tree:
        return best_tree(self.acceptance.optimistic, self.costs, self.depth, self.max_nodes)

    def observe(self, trees: list[Tree], paths: list[list[int]]) -> None:
        self.acceptance.observe(trees, paths)
