"""``--tree auto``: each row verifies its own EAGLE-2 tree, as many nodes as the costs say pay.

Every step the heads draft a skeleton (:func:`multitoken.tree_dynamic.skeleton`): under every
node its top candidates, each with its draft probability q. EAGLE-2 (Li et al. 2024) ranks
nodes by the product of q along the path; small heads are not calibrated (the tiny test heads
claim q ≈ 0.05 and are right a third of the time; others claim 0.9 and are right half of it),
so here each q is first mapped to a(q), the rate at which candidates of a similar q were
accepted where they were offered (their parent kept) so far in this call
(:class:`Calibration`). A node is kept with chance v = Π a(q) along its path, each row ranks
its nodes by v, and a row keeping its n best nodes expects

    E_b[tokens | n] = 1 + Σ_{its n best nodes} v

The step takes the n that maximises Σ_b E_b[tokens | n] / (c(n + 1) + d) — the rows of a
batch verify equally many nodes in one pass — with c(q) the measured verify cost and d the
heads' drafting cost (:mod:`multitoken.costs`), mapped through the line that best fits the
steps timed in this call (:class:`StepCosts`), and each row's r-th best v scaled by how nodes of
that rank turned out so far (:class:`RankScale`). A peaked draft makes the best nodes a chain,
and n = 0 (verify the pending token alone) wins when no draft pays for its place. Drafting
itself is judged before it happens: when the recent steps' best rates, their drafting paid for,
average below a plain step's (:data:`PAYOFF_DECAY`), drafting rests 1, 2, 4, …
:data:`LONGEST_REST` steps before it is tried again (the chain's K = 0).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

import torch

from multitoken.costs import CostModel
from multitoken.tree import Tree

MAX_NODES = 32  # the most drafts one step verifies
LONGEST_REST = 16  # plain steps in a row, at most, before drafting is tried again
PAYOFF_DECAY = 0.8  # weight of the past in the running payoff of drafting (5 steps or so)
# Bucket boundaries of draft probabilities q; candidates in one bucket share one a(q)
EDGES = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_EDGES = torch.tensor(EDGES)
# a(q) before anything is seen: the bucket's middle q, but at least PRIOR_FLOOR (optimistic, as
# the chain's prior of 0.6 in multitoken.costs.Acceptance: the first steps verify candidates)
PRIOR_FLOOR = 0.3
_PRIORS = ((torch.tensor((0.0, *EDGES)) + torch.tensor((*EDGES, 1.0))) / 2).clamp(min=PRIOR_FLOOR)


@dataclass
class Calibration:
    """a(q) per bucket of :data:`EDGES`: (accepted + ``weight`` × prior) / (offered + ``weight``)
    with the prior the bucket's middle q, at least :data:`PRIOR_FLOOR`, every count decaying by
    ``decay`` a step (recent steps count most), plus one standard error (optimism, as
    :attr:`multitoken.costs.Acceptance.optimistic`: a bucket seen little gets verified, so heads
    better than they claim are found out)."""

    weight: float = 2.0
    decay: float = 0.99
    hits: torch.Tensor = field(default_factory=lambda: torch.zeros(len(EDGES) + 1))
    offers: torch.Tensor = field(default_factory=lambda: torch.zeros(len(EDGES) + 1))
    _rates: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def rates(self) -> torch.Tensor:
        """a of every bucket, one standard error above its estimate."""
        if self._rates is None:
            self._rates = self._estimate()
        return self._rates

    def _estimate(self) -> torch.Tensor:
        seen = self.offers + self.weight
        a = (self.hits + self.weight * _PRIORS) / seen
        return (a + (a * (1 - a) / seen).sqrt()).clamp(max=1.0)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """a(q) for draft probabilities ``q`` (any shape)."""
        rates, edges = self.rates.to(q.device), _EDGES.to(q.device)
        return rates[torch.bucketize(q.contiguous(), edges)]

    def observe(self, q: torch.Tensor, accepted: torch.Tensor) -> None:
        """One step: the draft probabilities of the candidates offered and whether each was
        accepted."""
        buckets = torch.bucketize(q.contiguous(), _EDGES)
        self.forget()
        self.hits.index_add_(0, buckets, accepted.float())
        self.offers.index_add_(0, buckets, torch.ones_like(q, dtype=torch.float))
        self._rates = None

    def forget(self) -> None:
        """One step's decay (a step that verified nothing too)."""
        self.hits.mul_(self.decay)
        self.offers.mul_(self.decay)
        self._rates = None


# A row's nodes ranked by value share one correction per group of ranks: 1, 2, 3-4, 5-8, ...
RANK_GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_GROUP_OF = torch.tensor([bisect.bisect_left(RANK_GROUPS, r) for r in range(1, 257)])


@dataclass
class RankScale:
    """How the r-th best node of a row turns out against its value v: ρ = (accepted + w) /
    (Σ v + w) over the nodes of that rank group verified so far (decaying by ``decay`` a step,
    starting at 1 with ``weight`` w tokens' worth). a(q) is fitted on candidates one by one;
    summed over a tree, the values still come out high where the best of many estimates is
    picked (the winner's curse) and where candidates' chances are not independent (prompt
    lookup and the heads proposing one position). ρ is fitted on what the budget is decided
    on: the nodes in value order."""

    weight: float = 2.0
    decay: float = 0.98
    hits: torch.Tensor = field(default_factory=lambda: torch.zeros(len(RANK_GROUPS)))
    expected: torch.Tensor = field(default_factory=lambda: torch.zeros(len(RANK_GROUPS)))

    def __call__(self, n: int) -> torch.Tensor:
        """[n] ρ of ranks 1..n."""
        rho = (self.hits + self.weight) / (self.expected + self.weight)
        return rho[_GROUP_OF[:n]]

    def observe(self, values: torch.Tensor, hits: torch.Tensor) -> None:
        """One step: ``values`` [B, n] each row's n verified nodes' v in rank order, ``hits``
        [B, n] whether each was accepted."""
        self.hits.mul_(self.decay)  # every group's record fades, so ranks not bought for a
        self.expected.mul_(self.decay)  # while are tried again: the tail is probed, not dropped
        groups = _GROUP_OF[: values.size(1)].expand_as(values).flatten()
        self.hits.index_add_(0, groups, hits.flatten().float())
        self.expected.index_add_(0, groups, values.flatten().float())


@dataclass
class StepCosts:
    """What a step verifying n drafts costs, in units of t1, for n = 0..``n_max``: the model's
    m(n) = c(n + 1) + d (a bare trunk pass, measured apart) mapped through the line
    α + β m that best fits what this call's steps took (least squares, recent steps weighing
    most) — the tree mask, the cache moves and the bookkeeping cost too. The line starts as
    α = 0, β = 1: two points on it, at the ends of the range, weigh ``prior`` steps each."""

    costs: CostModel
    draft_tokens: int
    n_max: int
    decay: float = 0.95
    prior: float = 0.5
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, Σx, Σy, Σxx, Σxy
    _model: tuple | None = field(default=None, init=False, repr=False)

    def model(self) -> torch.Tensor:
        """[n_max + 1] m(n), kept while the drafting cost stays as it is."""
        d = self.costs.draft(self.draft_tokens)
        if self._model is None or self._model[0] != d:
            curve = [self.costs.verify(n + 1) + d for n in range(self.n_max + 1)]
            self._model = d, torch.tensor(curve)
        return self._model[1]

    def __call__(self) -> torch.Tensor:
        """[n_max + 1] the cost of a step verifying n = 0..n_max drafts."""
        model = self.model()
        w, sx, sy, sxx, sxy = self.sums
        for x in (float(model[0]), float(model[-1])):  # the prior's points, on y = x
            w, sx, sy = w + self.prior, sx + self.prior * x, sy + self.prior * x
            sxx, sxy = sxx + self.prior * x * x, sxy + self.prior * x * x
        spread = sxx - sx * sx / w
        beta = max(0.0, (sxy - sx * sy / w) / spread) if spread > 1e-12 else 1.0
        alpha = (sy - beta * sx) / w
        return alpha + beta * model  # non-decreasing in n as the model is, for β >= 0

    def observe(self, n: int, seconds: float) -> None:
        if not self.costs.learn_draft or self.costs.t1_s <= 0 or n > self.n_max:
            return  # a cost model given whole (a test) is kept as it is
        x, y = float(self.model()[n]), seconds / self.costs.t1_s
        self.sums = [s * self.decay for s in self.sums]
        for i, value in enumerate((1.0, x, y, x * x, x * y)):
            self.sums[i] += value


@dataclass
class TreeBudget:
    """The node budget of each ``--tree auto`` step (a :class:`multitoken.tree_dynamic.Sizer`):
    ``costs`` the verify and drafting costs, the heads drafting ``draft_tokens`` a step."""

    costs: CostModel
    draft_tokens: int
    max_nodes: int = MAX_NODES
    calibration: Calibration = field(default_factory=Calibration)
    rank_scale: RankScale = field(default_factory=RankScale)
    payoff: float = 1.0  # running mean of a drafting step's best rate over a plain step's
    rest: int = 0  # plain steps still to take before drafting again
    last_rest: int = 0  # the length of the rest before, doubled each time in a row
    step_costs: StepCosts = field(init=False)
    started: float | None = field(default=None, init=False)  # this step's start (perf_counter)
    # this step's nodes in value order [B, n_max] and their values v, for rank_scale
    ranked: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.step_costs = StepCosts(self.costs, self.draft_tokens, self.max_nodes)

    def drafts(self) -> bool:
        """Whether this step drafts (called once a step)."""
        if self.rest:
            self.rest -= 1
            self.calibration.forget()
            return False
        self.started = time.perf_counter()
        return True

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        """log a(q) of every node, from ``scores`` [B, N] its log draft probability."""
        return self.calibration(scores.float().exp()).log()

    def budget(self, values: torch.Tensor) -> int:
        """The n that maximises expected tokens per unit of time, given every row's skeleton
        node values ``values`` [B, N] (log v, the root's 0)."""
        B, N = values.shape
        n_max = min(self.max_nodes, N - 1)
        # value order as multitoken.tree_dynamic.best_nodes keeps them: equal values by index
        nodes = values[:, 1:].float().cpu()
        order = torch.sort(-nodes, dim=1, stable=True).indices[:, :n_max]
        v = nodes.gather(1, order).exp()  # [B, n_max]
        self.ranked = order + 1, v
        gain = (v * self.rank_scale(n_max)).cumsum(1).sum(0)  # [n_max]: n = 1..n_max nodes add
        expected = B + torch.cat([gain.new_zeros(1), gain])  # [n_max + 1]: n = 0..n_max
        rates = expected / self.step_costs()[: n_max + 1]  # drafting is spent, whatever n is
        best = int(rates.argmax())
        payoff = float(rates[best]) * self.costs.verify(1) / B  # over a plain step's rate
        self.payoff = PAYOFF_DECAY * self.payoff + (1 - PAYOFF_DECAY) * payoff
        if self.payoff < 1.0:  # drafting has stopped paying: rest from it
            self.last_rest = min(2 * self.last_rest or 1, LONGEST_REST)
            self.rest = self.last_rest
        else:
            self.last_rest = 0
        return best

    def observe(
        self, scores: torch.Tensor, kept: torch.Tensor, trees: list[Tree], paths: list[list[int]]
    ) -> None:
        """Calibrate on the candidates offered this step: the children of every node of each
        row's kept path. ``scores`` [B, N] log q of every skeleton node (NaN: none, a node
        of prompt lookup's), ``kept`` [B, n + 1] the skeleton nodes each row verified (its
        ``trees``), ``paths`` into them; the step's time, and how each rank turned out."""
        n = kept.size(1) - 1
        if self.started is not None:  # the step's tokens are on the host: it has finished
            self.step_costs.observe(n, time.perf_counter() - self.started)
            self.started = None
        if self.ranked is not None and n:
            nodes, v = self.ranked
            accepted = [set(row[i] for i in path) for row, path in zip(kept.tolist(), paths)]
            hits = [[node in acc for node in row[:n]] for row, acc in zip(nodes.tolist(), accepted)]
            self.rank_scale.observe(v[:, :n], torch.tensor(hits))
        self.ranked = None
        q = scores.gather(1, kept).float().exp().tolist()  # [B][n + 1]
        offered, hit = [], []
        for row, tree, path in zip(q, trees, paths):
            on_path = set(path)
            for node in path:
                for child in tree.children[node]:
                    if not math.isnan(row[child]):  # NaN: a lookup node, not the heads'
                        offered.append(row[child])
                        hit.append(child in on_path)
        if offered:
            self.calibration.observe(torch.tensor(offered), torch.tensor(hit))
        else:
            self.calibration.forget()
