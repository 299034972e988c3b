"""``--tree auto``: each row verifies its own EAGLE-2 tree, as many nodes as the costs say pay.

Every step the heads draft a skeleton (:func:`multitoken.decode.trees.dynamic.skeleton`): under every
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
heads' drafting cost as timed, the whole skeleton's (:mod:`multitoken.decode.costs`; DeepSeek's
modules run at every node of it, so theirs grows with its size), mapped through the line that
best fits the whole steps timed in this call (:class:`StepCosts`), and each row's r-th best v
scaled by how nodes of that rank turned out so far (:class:`RankScale`). A peaked draft makes the best nodes a chain, and n = 0 (verify the pending
token alone) wins when no draft pays for its place.

Whether to draft at all is judged before the skeleton is drafted, and not by these estimates:
by the tokens and seconds whole steps measurably gave, drafting steps against plain ones
(:class:`multitoken.decode.pace.Pace`, which documents the bounded exploration). Where drafting loses
— heads rarely right, drafting dear against the trunk pass — a step is a plain one (the chain's
K = 0: no skeleton, no tree) on all but a few tries. A try verifies one draft at least (n >= 1),
and while drafting rests the calibration's counts decay towards its prior, so the tries after a
long rest verify candidates again and find out whether the heads have become right.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from multitoken.decode.costs import CostModel
from multitoken.decode.pace import Pace, StepLine
from multitoken.decode.rates import HitRates
from multitoken.decode.trees.shape import Tree

# the most drafts one --tree auto step verifies: on the CPUs and models here a verify pass of
# more costs more than the deepest candidates' chances repay (multitoken.decode.trees.shape
# MAX_NODES bounds any tree a user gives)
AUTO_MAX_DRAFTS = 32
# Bucket boundaries of draft probabilities q; candidates in one bucket share one a(q)
EDGES = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_EDGES = torch.tensor(EDGES)
# a(q) before anything is seen: the bucket's middle q, but at least PRIOR_FLOOR (optimistic, as
# the chain's prior of 0.6 in multitoken.decode.costs.Acceptance: the first steps verify candidates)
PRIOR_FLOOR = 0.3
_PRIORS = ((torch.tensor((0.0, *EDGES)) + torch.tensor((*EDGES, 1.0))) / 2).clamp(min=PRIOR_FLOOR)


@dataclass
class Calibration:
    """a(q) per bucket of :data:`EDGES`: the optimistic :class:`multitoken.decode.rates.HitRates`
    of the candidates offered in each bucket (accepted or not), with the prior the bucket's
    middle q, at least :data:`PRIOR_FLOOR`: a bucket seen little gets verified, so heads better
    than they claim are found out."""

    weight: float = 2.0
    decay: float = 0.99
    counts: HitRates = field(init=False)
    _rates: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.counts = HitRates(_PRIORS, self.weight, self.decay)

    @property
    def rates(self) -> torch.Tensor:
        """a of every bucket, one standard error above its estimate."""
        if self._rates is None:
            self._rates = self.counts.optimistic()
        return self._rates

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """a(q) for draft probabilities ``q`` (any shape)."""
        rates, edges = self.rates.to(q.device), _EDGES.to(q.device)
        return rates[torch.bucketize(q.contiguous(), edges)]

    def observe(self, q: torch.Tensor, accepted: torch.Tensor) -> None:
        """One step: the draft probabilities of the candidates offered and whether each was
        accepted."""
        self.forget()
        self.counts.add(torch.bucketize(q.contiguous(), _EDGES), accepted)

    def forget(self) -> None:
        """One step's decay (a step that offered no candidate of the heads', or did not draft)."""
        self.counts.forget()
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
    """What a drafting step verifying n drafts takes, in units of t1, for n = 0..``n_max``: the
    model's m(n) = c(n + 1) + d (a bare trunk pass, measured apart, and the skeleton's drafting)
    mapped through the line α + β m that best fits what this call's whole steps took
    (:class:`multitoken.decode.pace.StepLine`) — the tree mask, the cache moves and the bookkeeping
    cost too. The line starts as α = 0, β = 1."""

    costs: CostModel
    draft_tokens: int
    n_max: int
    line: StepLine = field(default_factory=StepLine)
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
        model = self.model()  # non-decreasing in n, and so is the line (β >= 0)
        return self.line.at(model, (float(model[0]), float(model[-1])))

    def observe(self, n: int, seconds: float) -> None:
        """A whole drafting step verifying ``n`` drafts took ``seconds``."""
        if not self.costs.learn_draft or self.costs.t1_s <= 0 or n > self.n_max:
            return  # a cost model given whole (a test) is kept as it is
        self.line.observe(float(self.model()[n]), seconds / self.costs.t1_s)


@dataclass
class TreeBudget:
    """The node budget of each ``--tree auto`` step (a :class:`multitoken.decode.trees.dynamic.NodeBudget`):
    ``costs`` the verify and drafting costs, the heads drafting ``draft_tokens`` a step."""

    costs: CostModel
    draft_tokens: int
    max_nodes: int = AUTO_MAX_DRAFTS
    calibration: Calibration = field(default_factory=Calibration)
    rank_scale: RankScale = field(default_factory=RankScale)
    pace: Pace = field(init=False)
    step_costs: StepCosts = field(init=False)
    drafting: bool = field(default=False, init=False)  # whether this step drafts
    n: int = field(default=0, init=False)  # the drafts this step verifies
    # the model's tokens per row and seconds for the last drafting step: Pace's prior
    expect: tuple[float, float] | None = field(default=None, init=False)
    # this step's nodes in value order [B, n_max] and their values v, for rank_scale
    ranked: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.step_costs = StepCosts(self.costs, self.draft_tokens, self.max_nodes)
        self.pace = Pace(learn=self.costs.learn_draft)

    def new_call(self) -> None:
        """A new call decodes with what earlier ones learnt (multitoken.decode.api._learnt): the
        pace of whole steps, the calibration and the rank scale carry over."""
        self.pace.new_call()
        self.drafting, self.n, self.ranked = False, 0, None

    def drafts(self) -> bool:
        """Whether this step drafts (called once a step): by the whole steps measured."""
        self.n = 0
        self.drafting = self.pace.drafts(self.expect, (1.0, self.plain_seconds()))
        if not self.drafting:  # what the candidates were worth fades with the text
            self.calibration.forget()
        return self.drafting

    def plain_seconds(self) -> float:
        """A plain step by the model: a bare one-token pass (a plain step adds little to it)."""
        return self.costs.verify(1) * self.costs.t1_s

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        """log a(q) of every node, from ``scores`` [B, N] its log draft probability."""
        return self.calibration(scores.float().exp()).log()

    def budget(self, values: torch.Tensor) -> int:
        """The n that maximises expected tokens per unit of time, given every row's skeleton
        node values ``values`` [B, N] (log v, the root's 0)."""
        B, N = values.shape
        n_max = min(self.max_nodes, N - 1)
        # value order as multitoken.decode.trees.dynamic.best_nodes keeps them: equal values by index
        nodes = values[:, 1:].float().cpu()
        order = torch.sort(-nodes, dim=1, stable=True).indices[:, :n_max]
        v = nodes.gather(1, order).exp()  # [B, n_max]
        self.ranked = order + 1, v
        gain = (v * self.rank_scale(n_max)).cumsum(1).sum(0)  # [n_max]: n = 1..n_max nodes add
        expected = B + torch.cat([gain.new_zeros(1), gain])  # [n_max + 1]: n = 0..n_max
        step = self.step_costs()[: n_max + 1]
        rates = expected / step  # drafting is spent, whatever n is
        least = min(int(self.pace.trying), n_max)  # a try verifies a draft at least
        most = n_max
        if self.pace.learn:  # a chain's worth, doubling with each step that paid (pace.py)
            most = max(least, min(self.draft_tokens << min(self.pace.growth, 8), n_max))
        self.n = best = least + int(rates[least : most + 1].argmax())
        self.expect = float(expected[best]) / B, float(step[best]) * self.costs.t1_s
        return best

    def observe(
        self, scores: torch.Tensor, kept: torch.Tensor, trees: list[Tree], paths: list[list[int]]
    ) -> None:
        """Calibrate on the candidates offered this step: the children of every node of each
        row's kept path. ``scores`` [B, N] log q of every skeleton node (NaN: none, a node
        of prompt lookup's), ``kept`` [B, n + 1] the skeleton nodes each row verified (its
        ``trees``), ``paths`` into them; how each rank turned out."""
        n = kept.size(1) - 1
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

    def observe_step(self, tokens: float, seconds: float) -> None:
        """The whole step (drafting or plain) took ``seconds`` of wall time and emitted
        ``tokens`` per row."""
        if not self.costs.learn_draft:  # a fixed model: the step costs what it says
            seconds = (
                float(self.step_costs()[self.n]) * self.costs.t1_s
                if self.drafting
                else self.plain_seconds()
            )
        if self.pace.observe(self.drafting, tokens, seconds) and self.drafting:
            self.step_costs.observe(self.n, seconds)
