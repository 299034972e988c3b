"""Decoding: the trunk alone (method 1) or self-speculative decoding with the MTP heads (method 2).

A call runs the phases of :mod:`multitoken.decode.phases` — prefill, then propose → verify →
accept → commit → observe → emit (→ retire) until every row is done — over one explicit state,
with the draft source its plan asks for (:func:`draft_source`).

K is fixed (``--draft-len 3``) or chosen before each step (``--draft-len auto``,
:mod:`multitoken.decode.costs`) from the measured verify cost c(q), the measured drafting cost and
the live per-position acceptance, and K = 0 whenever the whole steps timed in the call say
drafting does not pay (:mod:`multitoken.decode.pace`; ``--tree auto`` alike). Whatever K each step
uses, a step is a correct speculative step, so greedy output is token-for-token the trunk's
own greedy output and sampled output follows the trunk's distribution exactly (speculative
sampling, ``multitoken.decode.sampling``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from multitoken.config import DEFAULT_TREE, GenerateConfig, draft_len_value
from multitoken.decode.chain import HeadsChain
from multitoken.decode.costs import CostModel, DraftLen, Stopwatch, cost_model
from multitoken.decode.kernels import choose_linear_kernel, linear_kernels
from multitoken.decode.kvcache import unrollable_layers
from multitoken.decode.phases import (
    Accepted,
    Decodable,
    Decoding,
    OnTokens,
    Plan,
    commit,
    emit,
    prefill,
    read_host,
    retire,
)
from multitoken.decode.rates import prefix_tries
from multitoken.decode.sampling import Sampling
from multitoken.decode.trees.budget import AUTO_MAX_DRAFTS, TreeBudget
from multitoken.decode.trees.dynamic import skeleton
from multitoken.decode.trees.lookup import PromptLookup
from multitoken.decode.trees.shape import Tree
from multitoken.decode.trees.spec import CHAIN, TreeSpec
from multitoken.decode.trees.step import Proposal, RowTrees, StaticTree
from multitoken.errors import MultitokenError

log = logging.getLogger("multitoken")


@dataclass
class Stats:
    """Per call: trunk passes, tokens emitted, τ = tokens per trunk pass, per-draft-position
    acceptance a_k = P(d_k accepted | d_1..d_{k-1} accepted), the K each step drafted
    (``draft_lens``; one K for all rows of a batch), the time spent drafting, wall time,
    tokens/s. Passes and tokens are summed over rows, so τ is the mean tokens per pass of one
    row."""

    trunk_passes: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    head_tries: list[int] = field(default_factory=list)
    head_hits: list[int] = field(default_factory=list)
    draft_lens: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # tokens each step verified (chain: K + 1)
    draft_s: float = 0.0  # seconds in the heads' draft calls
    draft_steps: int = 0  # steps that drafted (K > 0)
    seed: int | None = None  # what sampling was seeded with (drawn when none was given)

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.trunk_passes)

    @property
    def acceptance(self) -> list[float]:
        return [h / t if t else 0.0 for h, t in zip(self.head_hits, self.head_tries)]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "trunk_passes": self.trunk_passes,
            "tokens": self.tokens,
            "tau": self.tau,
            "acceptance": self.acceptance,
            "draft_lens": self.draft_lens,
            "nodes": self.nodes,
            "draft_s": self.draft_s,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "seed": self.seed,
        }


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt
    stats: Stats


@torch.no_grad()
def decode(
    model: Decodable,
    prompts: list[list[int]],
    plan: Plan,
    costs: CostModel | None,
    on_tokens: OnTokens | None = None,
) -> Generation:
    """prefill, then propose → verify → accept → commit → observe → emit until every row is
    done; the draft source (:func:`draft_source`) proposes a chain or each row's tree."""
    source = draft_source(model, plan, costs, len(prompts))
    state = prefill(model, prompts, plan)
    stats = Stats(
        trunk_passes=len(prompts),
        head_tries=[0] * plan.deepest,
        head_hits=[0] * plan.deepest,
        seed=None if plan.sampling.greedy else plan.cfg.seed,
    )
    first = [[t] for t in read_host(state.pending).tolist()]
    for row, tokens in zip(state.history, first):
        row.extend(tokens)
    retire(model, state, emit(state, first, plan, on_tokens))
    clock = costs.clock if costs is not None else time.perf_counter
    watch = Stopwatch(state.tokens.device, clock)
    while state.rows:
        start = clock()  # a whole step: choosing it, drafting, verifying, the bookkeeping
        proposal, accepted = step(model, state, plan, source, watch)
        done = emit(state, accepted.tokens, plan, on_tokens)
        stats.nodes.append(proposal.size)
        _record(stats, source, proposal, accepted.tokens, watch.take())
        retire(model, state, done)
        source.observe_step(clock() - start, sum(accepted.counts) / len(accepted.counts))
    stats.tokens = sum(map(len, state.out))
    return Generation(state.out, stats)


def step(
    model: Decodable, state: Decoding, plan: Plan, source: DraftSource, watch: Stopwatch
) -> tuple[Proposal, Accepted]:
    """One step over every row of ``state``: propose → verify → accept → commit → observe."""
    proposal = source.propose(model, state, plan, watch)
    verified = proposal.verify(model, state, plan)
    accepted = proposal.accept(verified, plan)
    commit(state, accepted)
    source.observe(proposal, accepted)
    return proposal, accepted


class DraftSource(Protocol):
    """What proposes each step's candidates and learns from what was accepted: the heads'
    chains (:class:`~multitoken.decode.chain.HeadsChain`), a static tree
    (:class:`~multitoken.decode.trees.step.StaticTree`), or each row's own tree of the heads'
    skeleton and prompt lookup (:class:`~multitoken.decode.trees.step.RowTrees`)."""

    def propose(self, model: Decodable, state: Decoding, plan: Plan, watch) -> Proposal: ...

    def observe(self, proposal: Proposal, accepted: Accepted) -> None: ...

    def observe_draft(self, seconds: float, proposal: Proposal) -> None: ...

    def observe_step(self, seconds: float, tokens: float) -> None: ...


# heads module -> {(mode, K max, [lookup,] batch rows, cost model): what an auto mode learnt};
# an entry goes when its heads do
_LEARNT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _learnt(model: Decodable, key: tuple, make: Callable[[], TreeBudget | DraftLen]):
    """The controller of an automatic mode as earlier calls with these heads left it: what
    whole steps measurably gave (:class:`multitoken.decode.pace.Pace`), the acceptance and the
    calibration carry over, so a call of a few dozen steps (a chat turn, a bench prompt, a
    server request) does not spend them relearning, which costs most where drafting loses.
    Keyed by the batch's rows and the cost model too: a step's time depends on both."""
    known = _LEARNT.setdefault(model.heads, {})
    if key not in known:
        known[key] = make()
    controller = known[key]
    controller.new_call()
    return controller


def draft_source(model: Decodable, plan: Plan, costs: CostModel | None, rows: int) -> DraftSource:
    """The draft source of a call's plan, for a batch of ``rows`` (the automatic modes price
    its steps by :meth:`CostModel.for_batch`)."""
    costs = None if costs is None else costs.for_batch(rows)
    spec = plan.tree
    if spec is not None and spec.static is not None:
        return StaticTree(spec.static)
    if spec is not None:  # each row's own tree: of N nodes, or as many as pay
        lookup = PromptLookup(spec.lookup) if spec.lookup else None
        if not spec.auto:
            return RowTrees(skeleton(plan.k_max), spec.shape, lookup)
        key = ("tree", plan.k_max, spec.lookup, rows, id(costs))  # lookup drafts too
        budget = _learnt(model, key, functools.partial(TreeBudget, costs, plan.k_max))
        return RowTrees(skeleton(plan.k_max), budget, lookup, costs)
    if not plan.speculate:
        return HeadsChain(DraftLen(0, fixed=0))
    if plan.auto:
        stateless = not model.heads.keeps_draft_state
        key = ("chain", plan.k_max, rows, id(costs))
        make = functools.partial(DraftLen, plan.k_max, costs=costs, stateless=stateless)
        return HeadsChain(_learnt(model, key, make))
    return HeadsChain(DraftLen(plan.k_max, fixed=plan.k_max))


def _record(stats: Stats, source: DraftSource, proposal, accepted: list[list[int]], draft_s):
    """Count the step in ``stats`` and tell ``source`` what drafting cost."""
    K = proposal.depth
    m = [len(a) - 1 for a in accepted]  # each row's accepted prefix
    stats.trunk_passes += len(m)
    stats.draft_lens.append(K)
    tries, hits = prefix_tries(m, K)
    for j in range(K):
        stats.head_tries[j] += tries[j]
        stats.head_hits[j] += hits[j]
    seconds = observe_drafting(source, proposal, draft_s)
    if seconds:
        stats.draft_s += seconds
        stats.draft_steps += 1


def observe_drafting(source: DraftSource, proposal: Proposal, draft_s: list[float]) -> float:
    """Tell ``source`` what drafting cost this step (``draft_s``: the stopwatch's sections);
    returns the seconds, 0 for a step that drafted nothing."""
    seconds = sum(draft_s)
    if seconds:  # a tree step may draft and then verify no draft (K = 0)
        source.observe_draft(seconds, proposal)
    return seconds


def generate(
    model: Decodable,
    prompts: list[list[int]],
    config: GenerateConfig | None = None,
    eos_id: int | Iterable[int] | None = None,
    on_tokens: OnTokens | None = None,
    costs: CostModel | None = None,
    **options,
) -> Generation:
    """Decode a batch of ``prompts`` (token ids, any lengths) together; a row ends at its
    ``max_new_tokens`` or at a stop token ``eos_id`` (one id, or several: chat models end a turn
    with a token of their own), which is kept as the row's last token.

    Options are the fields of :class:`GenerateConfig` (``max_new_tokens``, ``tree``,
    ``draft_len``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``speculate``). ``tree``: what
    a step verifies, by default each row's tree of drafts and prompt lookup sized by the costs
    (:data:`multitoken.config.DEFAULT_TREE`, :mod:`multitoken.decode.trees.budget`,
    :mod:`multitoken.decode.trees.lookup`); ``"chain"`` verifies one chain, whose length ``draft_len``
    ``"auto"`` (the default) chooses in 0..D before each step (:mod:`multitoken.decode.costs`) and a
    number fixes (K > D for the DeepSeek family only: its last module is reused recurrently;
    None is D, or D + ``--ttt-steps`` for modules trained past D); for trees, ``draft_len`` is
    how deep the heads draft. ``costs``: the :class:`~multitoken.decode.costs.CostModel` auto uses
    (default: measured once per trunk, device and dtype). ``on_tokens(row, tokens)`` is called
    as tokens are accepted (streaming)."""
    t0 = time.perf_counter()
    plan = make_plan(model, prompts, config, eos_id, **options)
    kernel = choose_linear_kernel(plan.cfg.linear_kernel, model)
    with linear_kernels(model, kernel):  # one kernel for the whole call: exact against plain
        tree_auto = plan.tree is not None and plan.tree.auto
        if (plan.auto or tree_auto) and plan.speculate and costs is None:
            q_max = (AUTO_MAX_DRAFTS if tree_auto else plan.k_max) + 1
            with torch.no_grad():  # a batch's step verifies q tokens in every row
                costs = cost_model(model.trunk, q_max * len(prompts), prompts[0])
        result = decode(model, prompts, plan, costs, on_tokens)
    result.stats.wall_s = time.perf_counter() - t0
    return result


def make_plan(
    model: Decodable,
    prompts: list[list[int]],
    config: GenerateConfig | None = None,
    eos_id: int | Iterable[int] | None = None,
    **options,
) -> Plan:
    """The options of one call, checked against the model and the prompts: what
    :func:`generate` decodes by (bench checks its requests with the same function)."""
    cfg = dataclasses.replace(config or GenerateConfig(), **options)
    cfg.validate()
    if cfg.speculate and model.heads is None:
        log.warning("this checkpoint has no MTP heads: decoding with the trunk alone")
        cfg = dataclasses.replace(cfg, speculate=False)
    if cfg.typical > 0 and cfg.speculate:
        log.warning(
            "typical acceptance is lossy: the output no longer follows the trunk's "
            "distribution exactly"
        )
    K, auto = _draft_len(cfg, model)
    spec = tree_spec(cfg)
    if spec is not None and spec.static is not None:
        K, auto = _static_depth(spec.static, model), False
    if spec is not None and spec.per_row:  # trees as deep as --draft-len (default: D)
        auto = False
    lookup = spec.lookup if spec is not None else 0
    check_prompts(model, prompts, cfg, max(K, lookup) if cfg.speculate else 0)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    gen = None
    if not sampling.greedy:
        if cfg.seed is None:  # a fresh draw each call, reported in the stats to repeat it
            cfg = dataclasses.replace(cfg, seed=secrets.randbits(63))
        gen = torch.Generator(device=model.parts.embed.weight.device)
        gen.manual_seed(cfg.seed)
    stop = (
        frozenset()
        if eos_id is None
        else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    )
    return Plan(cfg, K, auto, sampling, stop, gen, spec)


def check_prompts(
    model: Decodable,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    K: int,
    flag: str = "--prompt",
) -> None:
    """Refuse, in one line, prompts the trunk cannot decode: none, an empty one, one whose
    tokens plus the new ones (plus the ``K`` drafts a last verify pass may carry past them: 0
    without speculation) pass the context window, or any that would need a recurrent state
    given back. ``flag``: where the prompts came from (bench: its prompt options).

    The trunk reads every token but the last one emitted: a prompt of P tokens and N new ones
    occupy positions 0..P+N-2, and a verify pass K drafts beyond that, so P + N + K must not
    pass the window (a margin of one position)."""
    if not prompts:
        raise MultitokenError("no prompts", flag)
    limit = getattr(model.trunk.config, "max_position_embeddings", None)
    for p in prompts:
        if not p:
            raise MultitokenError("the prompt is empty", flag)
        if limit and len(p) + cfg.max_new_tokens + K > limit:
            reserve = f" + {K} drafted past them" if K else ""
            raise MultitokenError(
                f"prompt of {len(p)} tokens + {cfg.max_new_tokens} new tokens{reserve} exceeds "
                f"the context window of {limit}",
                flag,
            )
    recurrent = unrollable_layers(model.trunk.config)
    if recurrent and (cfg.speculate or len(set(map(len, prompts))) > 1):
        raise MultitokenError(
            f"this trunk keeps a recurrent state ({', '.join(recurrent)}) that cannot give back "
            "rejected drafts or padding: speculative decoding needs a KV cache it can crop; "
            "decode with --no-speculate, prompts of one length at a time"
        )


def tree_spec(cfg: GenerateConfig) -> TreeSpec | None:
    """The ``--tree`` in force: the one given, else :data:`multitoken.config.DEFAULT_TREE`
    (chains under ``--typical``, which verifies chains only); None: chains, or no drafts."""
    if not cfg.speculate:
        return None
    spec = TreeSpec.parse(
        cfg.tree if cfg.tree is not None else (CHAIN if cfg.typical > 0 else DEFAULT_TREE)
    )
    return None if spec.chain else spec


def _static_depth(tree: Tree, model: Decodable) -> int:
    """A static tree's depth, checked against how far the heads draft."""
    longest = model.heads.max_draft_len()
    if longest is not None and tree.max_depth > longest:
        raise MultitokenError(
            f"the tree is {tree.max_depth} deep; {model.family} heads draft at most D = "
            f"{model.depth} tokens",
            "--tree",
        )
    return tree.max_depth


def _draft_len(cfg: GenerateConfig, model: Decodable) -> tuple[int, bool]:
    """(K, or the most auto may choose; whether K is chosen per step) from ``draft_len``
    (already validated on its own)."""
    value = draft_len_value(cfg.draft_len)
    # as far as training taught the chain: D, or past it where a module was trained reused
    depth = (model.heads.trained_depth if model.heads is not None else model.depth) or 1
    if value is None or value == "auto":
        return depth, value == "auto"
    longest = model.heads.max_draft_len() if cfg.speculate else None
    if longest is not None and value > longest:
        raise MultitokenError(
            f"{model.family} heads draft at most D = {model.depth} tokens; got {value}",
            "--draft-len",
        )
    return value, False
