"""What a decoding step costs, and whether and how far to draft for the most tokens per second.

A speculative step with K drafts costs a trunk pass over K+1 tokens plus the heads' drafting,
and emits 1 + (the accepted prefix) tokens. In units of t1, one trunk pass over 1 token:

    c(q)          = time(trunk pass over q new tokens) / t1        measured: :func:`verify_cost`
    d(n)          = n × (measured seconds per drafted token) / t1   learnt from the draft calls
    E[tokens | K] = 1 + Σ_{j=1..K} Π_{i≤j} a_i                      a_i live, :class:`Acceptance`

Heads that keep a draft state (meta, deepseek: a KV cache per head, which must see every
committed position) run all K_max heads whenever they draft, so for them drafted(K) = K_max;
stateless heads (bpd) draft K.

``--draft-len auto`` (:class:`DraftLen`) takes, before each step, the K >= 1 that maximises
E[tokens | K] over the model's cost c(K+1) + d(drafted(K)) as the steps timed in the call say
such a step takes, and K = 0 (a plain step) when the steps measurably say drafting does not
pay: the model is the prior, the measured whole steps the verdict, and exploration is bounded
(:mod:`multitoken.decode.pace`).

c(q) is measured once per trunk, device, dtype and linear kernel (:mod:`multitoken.decode.kernels`; a
few forward passes) and kept in a cache keyed weakly by the trunk module — never as an attribute
on it — so ``multitoken bench`` and every ``generate`` call in a process share one measurement. A caller that wants other figures (a test,
a machine whose costs it knows) passes a :class:`CostModel` of its own.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from multitoken.decode.kernels import active_kernel
from multitoken.decode.kvcache import rollback_cache
from multitoken.decode.pace import Pace, StepLine
from multitoken.decode.rates import HitRates, prefix_tries
from multitoken.hardware import sync

VERIFY_REPEATS = 7  # multitoken bench: a careful measurement
AUTO_REPEATS = 3  # --draft-len auto: a quick one, once per trunk, device and dtype
CONTEXT_TOKENS = 64  # cached tokens under the measured passes
MAX_CURVE = 512  # c(q) is timed up to this q at most; past it, extended along its last slope
PRIOR_DRAFT_COST = (
    0.1  # d(1) in units of t1 until a draft has been timed (docs/design.md §Measured)
)


# ---------------------------------------------------------------------------------------------
# The verify-cost curve
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def verify_cost(
    trunk: nn.Module,
    prompt: list[int],
    q_max: int,
    repeats: int = VERIFY_REPEATS,
    qs: list[int] | None = None,
) -> dict:
    """c(q) for q = 1..q_max (or for the ``qs`` given, 1 among them): one bare ``transformers``
    pass over q new tokens on a ``DynamicCache`` holding ``prompt``, relative to q = 1 (median
    of ``repeats``). The q's take turns within each repeat so that drift (other load, clock
    changes) hits all alike; the cache is cropped back after each. Returns
    ``{"q": [...], "c": [...], "t1_s": seconds}``."""
    device = next(trunk.parameters()).device
    cache = rollback_cache(trunk.config)  # a bare DynamicCache, but one that crops past a window
    trunk(input_ids=torch.tensor([prompt], device=device), cache=cache, use_cache=True)
    tiled = (prompt * (q_max // len(prompt) + 1))[:q_max]
    qs = sorted({1, *(qs or range(1, q_max + 1))})
    inputs = {q: torch.tensor([tiled[:q]], device=device) for q in qs}
    samples: dict[int, list[float]] = {q: [] for q in inputs}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for q, ids in inputs.items():
            sync(device)
            start = time.perf_counter()
            trunk(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=q)
            sync(device)
            if repeat:
                samples[q].append(time.perf_counter() - start)
            cache.crop(-q)
    t1 = statistics.median(samples[1])
    return {
        "q": list(inputs),
        "c": [statistics.median(samples[q]) / t1 for q in inputs],
        "t1_s": t1,
    }


@dataclass
class CostModel:
    """Costs of a step in units of t1 (one trunk pass over one new token, ``t1_s`` seconds).

    ``c[q - 1]`` is c(q). The drafting cost per drafted token is learnt from the draft calls a
    decoder times (:meth:`observe_draft`): the median of the last few, ``prior_draft`` before
    any. ``clock``: what decoding times its steps and draft calls by (a test's fake one)."""

    c: list[float]
    t1_s: float
    prior_draft: float = PRIOR_DRAFT_COST
    # False: a fixed model (a test's figures): keep prior_draft, take steps to cost what the
    # model says; the auto modes then learn from the accepted tokens alone
    learn_draft: bool = True
    draft_samples: deque = field(default_factory=lambda: deque(maxlen=9))
    clock: Callable[[], float] = field(default_factory=lambda: time.perf_counter)
    # rows -> this model for batches of that many rows (for_batch), made once each
    batches: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_curve(cls, curve: dict, **options) -> CostModel:
        """From what :func:`verify_cost` returns."""
        return cls(list(curve["c"]), curve["t1_s"], **options)

    @property
    def q_max(self) -> int:
        return len(self.c)

    def verify(self, q: int) -> float:
        """c(q); past the measured range, extended along its last slope."""
        if q <= len(self.c):
            return self.c[q - 1]
        slope = self.c[-1] - self.c[-2] if len(self.c) > 1 else 1.0
        return self.c[-1] + max(slope, 0.0) * (q - len(self.c))

    @property
    def draft_per_token(self) -> float:
        if not self.learn_draft or not self.draft_samples:
            return self.prior_draft
        return statistics.median(self.draft_samples)

    def draft(self, drafted: int) -> float:
        """d(n): the heads drafting n tokens."""
        return self.draft_per_token * drafted

    def observe_draft(self, seconds: float, drafted: int) -> None:
        if drafted > 0 and self.t1_s > 0:
            self.draft_samples.append(seconds / self.t1_s / drafted)

    def for_batch(self, rows: int) -> CostModel:
        """The costs of a step of a batch of ``rows``, in units of its own plain step: a pass
        verifying q tokens in each of B rows reads the weights once for B·q tokens, as one
        row's pass over B·q tokens does, so c_B(q) = c(B·q) / c(B) and t1_B = c(B)·t1. A
        batch-1 curve would price a batch of 16 verifying 4 tokens a row at c(4) — 64 tokens
        at the price of 4 — and keep drafting where verification has become dear; the steps
        timed then correct what the model is off by (:class:`~multitoken.decode.pace.StepLine`).
        The drafting time is learnt per batch size (it grows with the rows). One model per
        ``rows``, kept, so that what an automatic mode learnt stays keyed to it. A model that
        learns nothing (``learn_draft`` False: a test's figures) is taken at its word for any
        batch."""
        if rows <= 1 or not self.learn_draft:
            return self
        if rows not in self.batches:
            one = self.verify(rows)
            self.batches[rows] = CostModel(
                [self.verify(rows * q) / one for q in range(1, self.q_max + 1)],
                self.t1_s * one,
                prior_draft=self.prior_draft,
                learn_draft=self.learn_draft,
                clock=self.clock,
            )
        return self.batches[rows]


# trunk module -> {(device, dtype): CostModel}; an entry goes when its trunk does
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _key(trunk: nn.Module) -> tuple[str, torch.dtype, str]:
    weight = next(trunk.parameters())
    return str(weight.device), weight.dtype, active_kernel(trunk)


def cost_model(trunk: nn.Module, q_max: int, context: list[int]) -> CostModel:
    """This trunk's :class:`CostModel` on its current device and dtype, measured over up to
    ``CONTEXT_TOKENS`` tokens of ``context`` the first time (or when a longer curve is asked
    for: a batch of B rows verifying q tokens each needs c up to B·q), then kept for the
    process."""
    known, key = _MEASURED.setdefault(trunk, {}), _key(trunk)
    old = known.get(key)
    if old is not None and old.q_max >= min(q_max, MAX_CURVE):
        return old
    # q = 1..4 each (a chain's K + 1), then 6, 8, 16 (a tree auto needs up to 33), doubling
    # for batches (CostModel.for_batch reads c(B·q)): the rest between: the first call of a
    # tree auto at batch 1 times 9 q's, not 33
    q_max = min(q_max, MAX_CURVE)
    qs = [q for q in (1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256) if q < q_max] + [q_max]
    curve = verify_cost(trunk, list(context[:CONTEXT_TOKENS]), q_max, AUTO_REPEATS, qs)
    known[key] = CostModel.from_curve(_interpolated(curve))
    if old is not None:  # keep what was learnt about drafting
        known[key].draft_samples = old.draft_samples
    return known[key]


def _interpolated(curve: dict) -> dict:
    """``curve`` with every q from 1 to its last, linear between the q's measured."""
    points = list(zip(curve["q"], curve["c"]))
    c = []
    for (q0, c0), (q1, c1) in zip(points, points[1:]):
        c += [c0 + (c1 - c0) * (q - q0) / (q1 - q0) for q in range(q0, q1)]
    c.append(points[-1][1])
    return {"q": list(range(1, len(c) + 1)), "c": c, "t1_s": curve["t1_s"]}


def remember_cost(trunk: nn.Module, curve: dict) -> CostModel:
    """Keep a curve measured elsewhere (``multitoken bench``'s careful one) for later calls."""
    model = CostModel.from_curve(curve)
    _MEASURED.setdefault(trunk, {})[_key(trunk)] = model
    return model


# ---------------------------------------------------------------------------------------------
# Acceptance and the choice of K
# ---------------------------------------------------------------------------------------------


@dataclass
class Acceptance:
    """Running estimates of a_k = P(d_k accepted | d_1..d_{k-1} accepted), k = 1..K_max: the
    means of :class:`multitoken.decode.rates.HitRates`, without a bonus for what was tried
    little: a deep position is tried only after every earlier draft was accepted, so a bonus
    there would never shrink. Whether to draft at all is not judged by them but by the steps
    measured (:class:`multitoken.decode.pace.Pace`)."""

    k_max: int
    prior: float = 0.6
    weight: float = 2.0
    decay: float = 0.98
    counts: HitRates = field(init=False)

    def __post_init__(self) -> None:
        prior = torch.full((self.k_max,), self.prior, dtype=torch.float64)  # as Python's floats
        self.counts = HitRates(prior, self.weight, self.decay)

    def observe(self, K: int, accepted: list[int]) -> None:
        """One step with K drafts; ``accepted``: each live row's accepted prefix length m."""
        self.counts.forget()
        tries, hits = prefix_tries(accepted, K)
        self.counts.tries[:K] += torch.tensor(tries, dtype=torch.float64)
        self.counts.hits[:K] += torch.tensor(hits, dtype=torch.float64)

    @property
    def rates(self) -> list[float]:
        return self.counts.mean().tolist()


def expected_tokens(a: list[float], K: int) -> float:
    """E[tokens | K] = 1 + Σ_{j=1..K} Π_{i≤j} a_i."""
    total, run = 1.0, 1.0
    for j in range(K):
        run *= a[j]
        total += run
    return total


def step_cost(costs: CostModel, K: int, drafted: int) -> float:
    """The model's cost of a chain step with K drafts, the heads drafting ``drafted``."""
    return costs.verify(K + 1) + (costs.draft(drafted) if K else 0.0)


def best_draft_len(
    a: list[float],
    costs: CostModel,
    drafted,
    measured: Callable[[float], float] | None = None,
    least: int = 0,
) -> tuple[int, list[float]]:
    """The K in ``least``..len(a) with the most expected tokens per unit of time, and that rate
    for every K from 0. ``drafted(K)``: how many tokens the heads draft to propose K;
    ``measured``: the model's cost of a step mapped to what such steps take
    (:meth:`StepLine.at`)."""
    measured = measured or (lambda m: m)
    rates = [
        expected_tokens(a, K) / measured(step_cost(costs, K, drafted(K))) for K in range(len(a) + 1)
    ]
    best = max(range(least, len(rates)), key=lambda K: (rates[K], -K))  # ties: the shorter K
    return best, rates


@dataclass
class DraftLen:
    """Chooses K before each step: ``fixed`` K, or (``fixed`` None) for the costs and the
    acceptance seen so far in this call, the K >= 1 with the most expected tokens per measured
    second (the acceptance's means, the model's cost through the line fitted to this call's
    steps, :class:`StepLine`), taken when :class:`Pace` says drafting measurably pays, and
    K = 0 (a plain step) when it says rest. ``stateless``: the heads keep no draft state, so
    they can draft fewer than ``k_max`` tokens without falling behind."""

    k_max: int
    fixed: int | None = None
    costs: CostModel | None = None
    stateless: bool = True
    acceptance: Acceptance | None = None
    pace: Pace | None = None
    line: StepLine = field(default_factory=StepLine)

    def __post_init__(self) -> None:
        if self.fixed is None and self.acceptance is None:
            self.acceptance = Acceptance(self.k_max)
        if self.fixed is None and self.pace is None:
            self.pace = Pace(learn=self.costs.learn_draft)

    def drafted(self, K: int) -> int:
        """How many tokens the heads draft for a step that verifies K of them."""
        if K == 0:
            return 0
        return K if (self.fixed is not None or self.stateless) else self.k_max

    def seconds(self, K: int) -> float:
        """What a step with K >= 1 drafts takes, as measured so far (the model's figure before)."""
        return self._measured(step_cost(self.costs, K, self.drafted(K))) * self.costs.t1_s

    def _measured(self, m: float) -> float:
        ends = [step_cost(self.costs, K, self.drafted(K)) for K in (1, self.k_max)]
        return self.line.at(m, tuple(ends))

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.k_max == 0:
            return 0
        a = self.acceptance.rates
        K = best_draft_len(a, self.costs, self.drafted, self._measured, least=1)[0]
        drafting = (expected_tokens(a, K), self.seconds(K))
        return K if self.pace.drafts(drafting, (1.0, self.plain_seconds())) else 0

    def plain_seconds(self) -> float:
        """A plain step by the model: a bare one-token pass (a plain step adds little to it)."""
        return self.costs.verify(1) * self.costs.t1_s

    def new_call(self) -> None:
        """A new call decodes with what earlier ones learnt (multitoken.decode.api._learnt)."""
        if self.pace is not None:
            self.pace.new_call()

    def observe(self, K: int, accepted: list[int]) -> None:
        if self.acceptance is not None:
            self.acceptance.observe(K, accepted)

    def observe_draft(self, seconds: float, drafted: int) -> None:
        if self.costs is not None and self.costs.learn_draft:
            self.costs.observe_draft(seconds, drafted)

    def observe_step(self, K: int, tokens: float, seconds: float) -> None:
        """A whole step with K drafts took ``seconds`` (wall) and gave ``tokens`` per row."""
        if self.pace is None:
            return  # a fixed K learns nothing
        if not self.costs.learn_draft:  # a fixed model: the step costs what it says
            seconds = self.seconds(K) if K else self.plain_seconds()
        if self.pace.observe(K > 0, tokens, seconds) and K and self.costs.learn_draft:
            m = step_cost(self.costs, K, self.drafted(K))  # the line is fitted to drafting steps
            self.line.observe(m, seconds / self.costs.t1_s)


# ---------------------------------------------------------------------------------------------
# Timing sections of a step
# ---------------------------------------------------------------------------------------------


class Stopwatch:
    """Seconds spent in sections of work on ``device`` without an extra device sync: on a CPU
    ``perf_counter``; on CUDA a pair of events per section, read by :meth:`take` once the work
    has finished (the decode loop syncs each step when it reads the accepted tokens)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.cuda, self.clock = device.type == "cuda", clock
        self.pending: list = []

    @contextlib.contextmanager
    def section(self):
        if self.cuda:
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            yield
            end.record()
            self.pending.append((begin, end))
        else:
            start = self.clock()
            yield
            self.pending.append(self.clock() - start)

    def take(self) -> list[float]:
        """The seconds of every section since the last call."""
        done = []
        for item in self.pending:
            if isinstance(item, tuple):
                item[1].synchronize()
                item = item[0].elapsed_time(item[1]) / 1e3
            done.append(item)
        self.pending = []
        return done
