"""Whether a step drafts, and what a step takes: measured whole steps, not the bare-pass model.

The cost model (:mod:`multitoken.decode.costs`: c(q) timed on bare trunk passes, the heads' drafting
time, live acceptance estimates) predicts what a step costs and gives. It is the prior, not the
verdict: a real step also pays for the bookkeeping around the passes (masks, cache moves,
reading the accepted tokens, emitting them), the bare curve is timed once and briefly, the
drafting of some families grows with the nodes drafted (DeepSeek's modules run at every node
of a tree), and the acceptance estimates are least sure exactly where drafting is judged (a
deep position is tried only after every earlier draft was accepted). On SmolLM2-135M with
first-draft acceptance 0.15, controllers that trusted the model drafted 3 tokens on most
steps at 0.85× plain decoding. So the automatic modes (``--draft-len auto``,
:class:`multitoken.decode.costs.DraftLen`; ``--tree auto``, :class:`multitoken.decode.trees.budget.TreeBudget`)
time every whole step, from choosing it to choosing the next (the
:class:`multitoken.decode.costs.CostModel`'s clock), and use the times twice:

* how far to draft — K, or a tree's node budget — is chosen by expected tokens over the
  model's cost mapped through the line α + β·cost that best fits the steps timed in the call
  (:class:`StepLine`: what the bookkeeping adds is learnt, by the size of the step);
* whether to draft at all is decided by what steps measurably gave (:class:`Pace`): the tokens
  per row and the seconds of recent drafting steps against those of recent plain steps, each
  side starting from the model's prediction, which fades as that side is timed. Drafting rests
  (K = 0; a plain step instead of a tree) whenever its measured tokens per second fall below a
  plain step's — whatever the model expected.

Exploration is bounded and decays with evidence, so that a call comes back to drafting when
acceptance improves (a stretch of code) and to resting when it drops: while resting, drafting is
tried once after :data:`FIRST_REST` plain steps, and each try after which drafting still does not
pay doubles the rest, up to :data:`LONGEST_REST` — where drafting loses, at most one step in 33
drafts; a step at which drafting pays halves the rest again. What drafting gave also fades by
:data:`STALE` a plain step (it moves with the text; what a plain step gives does not), so a try
after a long rest weighs most and a regime that turns is found within a try or two; a tree's try
verifies one draft at least. How many nodes a tree may verify grows only as drafting measurably
pays (:attr:`Pace.growth`, after TCP's slow start): a chain's worth (as many nodes as the heads
draft tokens), twice as many for each drafting step timed at a plain step's rate or more, and
back to a chain's worth as soon as drafting stops paying on the whole. On
SmolLM2-135M on 2 AVX2 cores a 32-node step took 2.5 plain steps and a 3-node one 1.6; a try is
there to learn whether drafting pays, which the small one tells as well, and one lucky step (prompt
lookup's, say) does not buy a run of large trees. A drop shows at once, since drafting steps are
measured as they run. While drafting pays, a plain step is timed every :data:`PLAIN_EVERY` steps
until :data:`PLAIN_TIMED` have been, so that the comparison rests on a measured plain step. A cost
model that learns nothing (``learn_draft`` False: a test's figures) is taken at its word for the
seconds and the tree's size; the tokens are always the ones the steps emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST_REST = 2  # plain steps before drafting is tried again, after it stopped paying
LONGEST_REST = 32  # the rest doubles after each try that did not pay, up to this: a try costs
# about half a plain step where drafting loses (1 in 33 steps: 1.5%), and a longer rest misses
# loops (prompt lookup's best case) that start mid-answer
PACE_DECAY = 0.8  # weight of the past in a side's running sums, per step of that side
STALE = 0.97  # ... and in drafting's, per plain step: what drafting gives moves with the text
PLAIN_EVERY = 8  # while drafting pays, a plain step is timed every this many steps ...
PLAIN_TIMED = 3  # ... until this many have been
OUTLIER = 4.0  # a step timed at more than this × its side's mean counts as that (a hiccup)


@dataclass
class StepLine:
    """What whole steps take against what the model says they cost: the line y = α + β·m (both
    in units of t1) that best fits the steps timed so far (least squares, each step's weight
    decaying by ``decay`` a step). Two prior points on y = x, at the ends of the model's range,
    weigh ``prior`` steps each: the line starts as the model itself and the steps timed move it
    — by what the tree mask, the cache moves, reading and emitting the tokens add, and by how
    far the bare curve, timed once and briefly, was off."""

    decay: float = 0.95
    prior: float = 0.5
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, Σx, Σy, Σxx, Σxy

    def fit(self, ends: tuple[float, float]) -> tuple[float, float]:
        """(α, β), with the prior's points at the model costs ``ends``; β >= 0, so that a
        step with more drafts never looks cheaper."""
        w, sx, sy, sxx, sxy = self.sums
        for x in ends:  # the prior's points, on y = x
            w, sx, sy = w + self.prior, sx + self.prior * x, sy + self.prior * x
            sxx, sxy = sxx + self.prior * x * x, sxy + self.prior * x * x
        spread = sxx - sx * sx / w
        beta = max(0.0, (sxy - sx * sy / w) / spread) if spread > 1e-12 else 1.0
        return (sy - beta * sx) / w, beta

    def at(self, m, ends: tuple[float, float]):
        """α + β·m: what a step the model prices at ``m`` (a number or a tensor) takes."""
        alpha, beta = self.fit(ends)
        return alpha + beta * m

    def observe(self, m: float, y: float) -> None:
        """A step the model priced at ``m`` took ``y`` (units of t1)."""
        self.sums = [s * self.decay for s in self.sums]
        for i, value in enumerate((1.0, m, y, m * m, m * y)):
            self.sums[i] += value


@dataclass
class Pace:
    """Whether a step drafts, judged by what steps measurably gave: for each side — steps that
    drafted, plain steps — the running sums of the tokens per row they emitted and the wall
    seconds they took (whole steps), each step's weight decaying by ``decay`` per step of that
    side. A side's rate is Σ tokens / Σ seconds, with the caller's prior (the model's
    prediction: tokens per row, seconds) as one more step of that side, as old as its first
    (it fades as the side is timed). The first drafting step is not counted when ``learn``:
    stateful heads read the whole prompt in it, first calls warm up.

    Drafting pays while its rate is at least a plain step's. When it stops paying, drafting
    rests for ``gap`` plain steps and is then tried once; each try after which it still does
    not pay doubles the gap (:data:`FIRST_REST` .. :data:`LONGEST_REST`), and each step at which
    it pays halves it. While it pays and fewer than :data:`PLAIN_TIMED` plain steps have been
    timed (``learn``), a plain step is taken every :data:`PLAIN_EVERY`."""

    learn: bool = True
    decay: float = PACE_DECAY
    sums: dict = field(default_factory=lambda: {False: [0.0] * 3, True: [0.0] * 3})
    seen: dict = field(default_factory=lambda: {False: 0, True: 0})  # steps counted per side
    warm: bool = False  # the first drafting step has passed
    gap: int = FIRST_REST
    resting: int = 0  # plain steps in a row since drafting last paid or was tried
    drafting: int = 0  # steps in a row that drafting paid
    trying: bool = False  # this step drafts though drafting does not pay: a try
    growth: int = 0  # drafting steps at a plain step's rate or more since drafting last lost
    plain: tuple[float, float] | None = None  # the model's plain step, as last told

    def new_call(self) -> None:
        """A new decoding call: its first drafting step warms up again (stateful heads read the
        whole prompt in it); what steps gave, and the rest schedule, carry over."""
        self.warm, self.trying = False, False

    def rate(self, side: bool, prior: tuple[float, float] | None) -> float | None:
        """Tokens per row per second of ``side`` (True: drafting); None: nothing known."""
        tokens, seconds, _ = self.sums[side]
        if prior is not None:
            weight = self.decay ** self.seen[side]
            tokens, seconds = tokens + weight * prior[0], seconds + weight * prior[1]
        return tokens / seconds if seconds > 0 else None

    def pays(self, drafting: tuple[float, float] | None, plain: tuple[float, float]) -> bool:
        """Whether drafting's rate is at least a plain step's (yes while nothing is known)."""
        ours, theirs = self.rate(True, drafting), self.rate(False, plain)
        return ours is None or theirs is None or ours >= theirs

    def drafts(self, drafting: tuple[float, float] | None, plain: tuple[float, float]) -> bool:
        """Whether this step drafts (called once a step): ``drafting`` and ``plain`` the
        model's prediction (tokens per row, seconds) for either kind of step."""
        self.trying, self.plain = False, plain
        if self.pays(drafting, plain):
            self.gap, self.resting = max(FIRST_REST, self.gap // 2), 0
            self.drafting += 1
            if self.learn and self.seen[False] < PLAIN_TIMED and self.drafting > PLAIN_EVERY:
                self.drafting = 0
                return False  # time a plain step: the comparison needs one
            return True
        self.drafting = self.growth = 0
        if self.resting >= self.gap:  # rested long enough: try drafting once
            self.resting, self.gap = 0, min(2 * self.gap, LONGEST_REST)
            self.trying = True
            return True
        self.resting += 1
        return False

    def observe(self, drafted: bool, tokens: float, seconds: float) -> bool:
        """A whole step took ``seconds`` and emitted ``tokens`` per row; whether it counted."""
        if drafted and self.learn and not self.warm:
            self.warm = True
            return False
        sums = self.sums[drafted]
        if sums[2] > 0:
            seconds = min(seconds, OUTLIER * sums[1] / sums[2])
        self.sums[drafted] = [s * self.decay + x for s, x in zip(sums, (tokens, seconds, 1.0))]
        self.seen[drafted] += 1
        if drafted:  # trees grow with each step that paid on its own (drafts() resets them)
            plain = self.rate(False, self.plain)
            self.growth += plain is None or tokens >= plain * seconds
        if not drafted:  # while drafting rests, what it gave grows old; plain steps do not
            self.sums[True] = [s * STALE for s in self.sums[True]]
        return True
