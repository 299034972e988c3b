"""``--draft-len auto``: K chosen before each step from c(q), the drafting cost and the live
acceptance, and K = 0 wherever the whole steps timed say drafting does not pay. Output stays
plain greedy whatever K each step takes; good heads make it draft long, useless heads make it
stop drafting; the choice itself follows E[tokens | K] / cost, the measured steps decide whether
to draft at all (:mod:`multitoken.decode.pace`)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import (
    PROMPTS,
    CheckedHeads,
    OracleHeads,
    hf_greedy,
    micro_llama,
    model_of,
    perturb_heads,
)

from multitoken.cli import build_parser
from multitoken.config import GenerateConfig, draft_len_value
from multitoken.decode import costs
from multitoken.decode.api import draft_source, generate, make_plan
from multitoken.decode.costs import Acceptance, CostModel, DraftLen, best_draft_len, expected_tokens
from multitoken.decode.pace import FIRST_REST, LONGEST_REST, PLAIN_EVERY, PLAIN_TIMED, Pace


def fixed_costs(c: list[float], draft: float) -> CostModel:
    """A cost model that learns nothing: the test, not the machine's load, decides K."""
    return CostModel(c, t1_s=1e-3, prior_draft=draft, learn_draft=False)


CHEAP = fixed_costs([1.0, 1.02, 1.04, 1.06, 1.08], 0.02)  # drafting nearly free
REALISTIC = fixed_costs([1.0, 1.44, 1.92, 1.73, 1.8], 0.1)  # SmolLM2 on 2 AVX2 cores


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_auto_greedy_equals_plain_for_every_family_and_batch_row(family):
    model = perturb_heads(model_of(family, depth=3))
    plain = generate(model, PROMPTS, max_new_tokens=30, speculate=False)
    auto = generate(
        model, PROMPTS, max_new_tokens=30, tree="chain", draft_len="auto", costs=REALISTIC
    )
    assert auto.tokens == plain.tokens
    ks = auto.stats.draft_lens
    assert 0 in ks and max(ks) >= 2, ks  # K really changed from step to step
    assert len(auto.stats.acceptance) == 3
    for prompt, tokens in zip(PROMPTS, plain.tokens):
        assert tokens == hf_greedy(model, prompt, 30)
        alone = generate(
            model, [prompt], max_new_tokens=30, tree="chain", draft_len="auto", costs=CHEAP
        )
        assert alone.tokens == [tokens]


@pytest.mark.parametrize("tree, points", [("chain", 3), (None, 9)])
def test_auto_is_the_default_and_measures_its_costs_once_per_trunk(tree, points):
    """Chains measure c(1..3) for K up to D = 2; the default, trees sized by the costs, c(q)
    for q = 1..4, 6, 8, 16, 32 and 33 (the interpolated rest: tests/decode/test_costs.py)."""
    model = perturb_heads(model_of("bpd", depth=2), scale=0.3)
    assert GenerateConfig().draft_len == "auto"
    calls = []
    hook = model.trunk.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = generate(model, PROMPTS[:1], max_new_tokens=8, tree=tree)  # measures, decodes
        measuring = len(calls) - first.stats.trunk_passes
        assert measuring == points * (costs.AUTO_REPEATS + 1) + 1  # +1: the cached context
        calls.clear()
        again = generate(model, PROMPTS[:1], max_new_tokens=8, tree=tree)
        assert len(calls) == again.stats.trunk_passes  # the curve was kept
    finally:
        hook.remove()
    assert again.tokens == first.tokens
    assert len(first.stats.draft_lens) == first.stats.trunk_passes - 1  # one K per step


def auto_with_oracle_heads(wrong: bool, costs: CostModel):
    """Decode with ``--draft-len auto`` and heads that always draft the trunk's next tokens (or
    never do); the output is plain greedy's either way. Returns the result."""
    model = model_of("bpd")
    plain = generate(model, PROMPTS, max_new_tokens=40, speculate=False)
    model.heads = OracleHeads(model, wrong=wrong)
    out = generate(model, PROMPTS, max_new_tokens=40, tree="chain", draft_len="auto", costs=costs)
    assert out.tokens == plain.tokens
    return out


def test_always_right_heads_make_auto_draft_long():
    out = auto_with_oracle_heads(wrong=False, costs=CHEAP)
    ks = out.stats.draft_lens
    assert ks[0] >= 1  # the prior drafts from the first step on
    assert all(k == 4 for k in ks[3:]), ks  # then the longest K, every step
    assert out.stats.acceptance == [1.0] * 4


def test_always_wrong_heads_make_auto_fall_back_to_plain_steps():
    out = auto_with_oracle_heads(wrong=True, costs=REALISTIC)
    ks = out.stats.draft_lens
    assert ks[0] >= 1 and ks[-1] == 0
    later = ks[5:]
    assert sum(k == 0 for k in later) >= 0.9 * len(later), ks
    assert out.stats.acceptance[0] == 0.0


@pytest.mark.parametrize("family", ["meta", "deepseek", "bpd"])
def test_heads_that_skip_steps_still_draft_what_full_recomputation_gives(family):
    """Steps with K = 0 draft nothing: the positions they commit reach the heads at the next
    drafting step, and a head with a KV cache keeps drafting exactly (docs/design.md invariant 3)."""
    model = perturb_heads(model_of(family, depth=3))
    checked = CheckedHeads(model)
    model.heads = checked
    out = generate(
        model, PROMPTS, max_new_tokens=30, tree="chain", draft_len="auto", costs=REALISTIC
    )
    assert 0 in out.stats.draft_lens and checked.checked >= 3
    model.heads = checked.inner
    assert out.tokens == generate(model, PROMPTS, max_new_tokens=30, speculate=False).tokens


def test_auto_sampling_runs_and_keeps_to_the_trunk_vocabulary():
    model = perturb_heads(model_of("deepseek", depth=2), scale=0.3)
    out = generate(
        model, PROMPTS, max_new_tokens=20, draft_len="auto", costs=CHEAP, temperature=1.0, seed=1
    )
    assert [len(t) for t in out.tokens] == [20] * 3
    assert all(0 <= t < 64 for row in out.tokens for t in row)


# ---------------------------------------------------------------------------------------------
# The choice itself
# ---------------------------------------------------------------------------------------------


def test_expected_tokens_and_the_best_k_by_hand():
    a = [0.9, 0.5]
    assert expected_tokens(a, 0) == 1.0
    assert expected_tokens(a, 2) == pytest.approx(1 + 0.9 + 0.45)
    model = fixed_costs([1.0, 1.2, 1.5], 0.1)
    # stateless: K=1 1.9 / (1.2 + 0.1) = 1.46; K=2 2.35 / (1.5 + 0.2) = 1.38
    best, rates = best_draft_len(a, model, lambda K: K)
    assert best == 1 and rates == pytest.approx([1.0, 1.9 / 1.3, 2.35 / 1.7])
    # heads with a draft state draft both tokens whatever K: K=1 1.9 / 1.4 < K=2 2.35 / 1.7
    best, _ = best_draft_len(a, model, lambda K: 2 if K else 0)
    assert best == 2
    # useless heads: a plain step
    assert best_draft_len([0.05, 0.05], model, lambda K: K)[0] == 0


def test_acceptance_starts_at_its_prior_learns_and_drifts_back_when_not_tried():
    est = Acceptance(3, prior=0.6, weight=2.0, decay=0.9)
    assert est.rates == pytest.approx([0.6] * 3)
    for _ in range(20):
        est.observe(2, [2])  # both drafts accepted, the third position never tried
    assert est.rates[0] > 0.9 and est.rates[1] > 0.9 and est.rates[2] == pytest.approx(0.6)
    for _ in range(20):
        est.observe(1, [0])  # the first draft rejected
    low = est.rates[0]
    assert low < 0.2
    for _ in range(40):
        est.observe(0, [0])  # plain steps: nothing tried
    assert low < est.rates[0] < 0.6  # back towards the prior: drafting is tried again


def test_draft_len_policy_drafts_all_heads_when_they_keep_state():
    assert DraftLen(3, fixed=2).drafted(2) == 2
    assert DraftLen(3, costs=CHEAP, stateless=True).drafted(1) == 1
    assert DraftLen(3, costs=CHEAP, stateless=False).drafted(1) == 3
    assert DraftLen(3, costs=CHEAP, stateless=False).drafted(0) == 0


def test_cost_model_extends_the_curve_and_learns_the_drafting_cost():
    model = CostModel([1.0, 1.4, 1.6], t1_s=0.01)
    assert model.verify(5) == pytest.approx(2.0)  # last slope 0.2 per token
    assert model.draft(2) == pytest.approx(2 * costs.PRIOR_DRAFT_COST)
    model.observe_draft(0.003, 3)  # 1 ms per drafted token = 0.1 t1
    model.observe_draft(0.006, 3)
    model.observe_draft(0.009, 3)
    assert model.draft_per_token == pytest.approx(0.2)


def test_draft_len_flag_takes_auto_or_a_number():
    assert draft_len_value("auto") == "auto" and draft_len_value("3") == 3
    assert draft_len_value(None) is None and draft_len_value(2) == 2
    with pytest.raises(ValueError):
        draft_len_value("many")
    parser = build_parser()
    base = ["generate", "--checkpoint", "x"]
    assert parser.parse_args(base + ["--draft-len", "auto"]).draft_len == "auto"
    assert parser.parse_args(base + ["--draft-len", "2"]).draft_len == 2
    assert not hasattr(parser.parse_args(base), "draft_len")  # the dataclass default applies
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--draft-len", "many"])
    model = model_of("bpd", depth=2)
    with pytest.raises(ValueError, match="expected auto or a whole number") as err:
        generate(model, PROMPTS[:1], max_new_tokens=2, draft_len="many")
    assert err.value.flag == "--draft-len"
    with pytest.raises(ValueError, match="must be >= 1 or auto, got 0") as err:
        generate(model, PROMPTS[:1], max_new_tokens=2, draft_len=0)
    assert err.value.flag == "--draft-len"


def test_a_micro_trunk_has_a_measured_curve_keyed_by_dtype():
    trunk = micro_llama(seed=5)
    first = costs.cost_model(trunk, 3, [5, 6, 7])
    assert costs.cost_model(trunk, 2, [5, 6, 7]) is first  # a shorter curve is already known
    assert len(first.c) == 3 and first.t1_s > 0
    trunk.to(torch.float64)
    assert costs.cost_model(trunk, 2, [5, 6, 7]) is not first


def test_the_verify_cost_is_each_pass_relative_to_a_one_token_pass(monkeypatch):
    """A clock that a pass over q tokens advances by 1 + (q - 1) / 2: c(q) must read 1, 1.5, 2
    and t1 one tick."""
    from types import SimpleNamespace

    trunk = micro_llama(seed=6)
    clock = [0.0]

    def tick(_module, _args, kwargs):
        clock[0] += 1 + (kwargs["input_ids"].size(1) - 1) / 2

    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    hook = trunk.register_forward_pre_hook(tick, with_kwargs=True)
    try:
        measured = costs.verify_cost(trunk, [5, 6, 7], 3, repeats=3)
    finally:
        hook.remove()
    assert measured == {"q": [1, 2, 3], "c": [1.0, 1.5, 2.0], "t1_s": 1.0}


def test_cost_model_measures_a_long_curve_sparsely_and_fills_it_in(monkeypatch):
    """Up to q = 20: q = 1..4, 6, 8, 16 and 20 are timed (fake clock: 1 + (q - 1) / 2 ticks),
    the q's between them are interpolated, exact for this straight line."""
    from types import SimpleNamespace

    trunk = micro_llama(seed=7)
    clock, timed = [0.0], set()

    def tick(_module, _args, kwargs):
        q = kwargs["input_ids"].size(1)
        timed.add(q)
        clock[0] += 1 + (q - 1) / 2

    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    hook = trunk.register_forward_pre_hook(tick, with_kwargs=True)
    try:
        model = costs.cost_model(trunk, 20, [5, 6, 7, 8])
    finally:
        hook.remove()
    assert timed == {1, 2, 3, 4, 6, 8, 16, 20}  # 4: the context's prefill as well
    assert model.c == pytest.approx([1 + (q - 1) / 2 for q in range(1, 21)])


def test_a_batch_is_priced_by_its_tokens_over_its_own_plain_step():
    """c_B(q) = c(B·q) / c(B) and t1_B = c(B)·t1, past the curve along its last slope; one
    model per batch size, kept; a batch of one is the model itself."""
    model = CostModel([1 + (q - 1) / 2 for q in range(1, 9)], t1_s=0.01)  # c(q) = (q + 1) / 2
    four = model.for_batch(4)
    assert four.t1_s == pytest.approx(0.01 * 2.5)
    assert four.c[:3] == pytest.approx([1.0, 4.5 / 2.5, 6.5 / 2.5])  # c(4), c(8), c(12) / c(4)
    assert model.for_batch(4) is four and model.for_batch(1) is model
    four.observe_draft(0.025, 1)  # learnt per batch size: the base model keeps its prior
    assert four.draft_per_token == pytest.approx(1.0) and model.draft_per_token == model.prior_draft


def test_a_batch_draft_source_prices_its_steps_for_its_rows():
    model = model_of("bpd", depth=2)
    plan = make_plan(model, PROMPTS[:2], tree="chain", draft_len="auto", max_new_tokens=4)
    measured = CostModel([1.0, 1.2, 1.4], t1_s=0.01)
    source = draft_source(model, plan, measured, 2)
    assert source.choice.costs is measured.for_batch(2)
    assert source.choice.costs.t1_s == pytest.approx(0.012)
    fixed = CostModel([1.0, 1.2, 1.4], t1_s=0.01, learn_draft=False)  # a test's figures: as given
    assert draft_source(model, plan, fixed, 2).choice.costs is fixed


# ---------------------------------------------------------------------------------------------
# Measured whole steps decide whether to draft (multitoken.decode.pace)
# ---------------------------------------------------------------------------------------------


def runs_of(choices: list[bool], value: bool) -> list[int]:
    """The lengths of the runs of ``value`` in ``choices``."""
    runs, count = [], 0
    for c in choices + [not value]:
        if c == value:
            count += 1
        elif count:
            runs, count = runs + [count], 0
    return runs


def test_pace_rests_twice_as_long_after_each_try_that_did_not_pay():
    pace = Pace(learn=False)
    plain, dear = (1.0, 1.0), (1.0, 2.0)  # drafting: one token per row in two seconds
    choices = []
    for _ in range(200):
        drafts = pace.drafts(dear, plain)
        pace.observe(drafts, 1.0, 2.0 if drafts else 1.0)
        choices.append(drafts)
    assert runs_of(choices, False)[:7] == [FIRST_REST, 4, 8, 16, 32, LONGEST_REST, LONGEST_REST]
    assert runs_of(choices, True) == [1] * len(runs_of(choices, True))  # each try: one step
    for _ in range(3):  # drafting starts paying: each step that it does halves the rest
        assert pace.drafts(dear, plain) or pace.resting
        pace.observe(True, 20.0, 2.0)
    assert pace.gap < LONGEST_REST


def test_pace_times_a_few_plain_steps_while_drafting_pays_and_skips_the_first_draft():
    pace = Pace(learn=True)
    choices = []
    for _ in range(100):
        drafts = pace.drafts((3.0, 1.5), (1.0, 1.0))
        counted = pace.observe(drafts, 3.0 if drafts else 1.0, 1.5 if drafts else 1.0)
        assert counted or (drafts and len(choices) == 0)  # the first drafting step warms up
        choices.append(drafts)
    plain = [i for i, d in enumerate(choices) if not d]
    assert len(plain) == PLAIN_TIMED and plain[0] == PLAIN_EVERY
    assert pace.seen == {False: PLAIN_TIMED, True: 100 - PLAIN_TIMED - 1}


def test_pace_growth_counts_steps_that_paid_on_their_own_until_drafting_loses():
    pace, plain = Pace(learn=False), (1.0, 1.0)  # a plain step: a token a second
    for tokens, growth in ((3.0, 1), (3.0, 2), (1.0, 2), (4.0, 3)):  # drafting takes 2 s
        assert pace.drafts((2.0, 2.0), plain)
        pace.observe(True, tokens, 2.0)
        assert pace.growth == growth
    for _ in range(6):  # drafting stops paying: growth starts again from nothing
        drafts = pace.drafts((2.0, 2.0), plain)
        pace.observe(drafts, 1.0, 2.0 if drafts else 1.0)
    assert not pace.pays((2.0, 2.0), plain) and pace.growth == 0


# The bare curve says drafting is cheap; the steps, timed whole, say a drafting step takes
# 1.6 + 0.1 K ms against a plain step's 1 ms (drafting 0.3-0.5 of a pass, bookkeeping, ...)
def model_says_cheap() -> CostModel:
    return CostModel([1.0, 1.1, 1.2, 1.3], t1_s=1e-3, prior_draft=0.02)  # it learns


def measured(K: int) -> float:
    return 1e-3 if K == 0 else (1.6 + 0.1 * K) * 1e-3


LOSING = [0.3, 0.5, 0.5]  # E[tokens | 3] = 1.53: 1.12 tokens a t1 by the model, 0.8 measured
PAYING = [0.85, 0.8, 0.75]  # E[tokens | 3] = 3.04: 1.6 tokens a t1 measured


def drive(choice: DraftLen, steps: int, a: list[float], rng: random.Random) -> list[int]:
    """``steps`` steps of ``choice``, each draft accepted with chance ``a[j]`` after the ones
    before it were, each step taking :func:`measured`; the K of every step."""
    ks = []
    for _ in range(steps):
        K = choice.choose()
        m = 0
        while m < K and rng.random() < a[m]:
            m += 1
        choice.observe(K, [m])
        choice.observe_step(K, m + 1.0, measured(K))
        ks.append(K)
    return ks


@pytest.mark.parametrize("stateless", [True, False])
def test_auto_rests_where_drafting_steps_cost_more_per_token_than_plain_ones(stateless):
    choice = DraftLen(3, costs=model_says_cheap(), stateless=stateless)
    a = choice.acceptance.rates
    assert best_draft_len(LOSING, choice.costs, choice.drafted)[0] > 0  # the model would draft
    assert a == [0.6] * 3
    ks = drive(choice, 400, LOSING, random.Random(0))
    later = ks[100:]
    assert sum(k == 0 for k in later) >= 0.9 * len(later), ks
    assert 0 < sum(k > 0 for k in later)  # but drafting is still tried now and then
    # the steps timed moved the model's line: a drafting step is dearer than c + d says
    assert choice.seconds(3) > 1.25 * step_model_seconds(choice, 3)


def step_model_seconds(choice: DraftLen, K: int) -> float:
    return costs.step_cost(choice.costs, K, choice.drafted(K)) * choice.costs.t1_s


@pytest.mark.parametrize("stateless", [True, False])
def test_auto_keeps_drafting_where_the_measured_steps_say_it_pays(stateless):
    choice = DraftLen(3, costs=model_says_cheap(), stateless=stateless)
    ks = drive(choice, 300, PAYING, random.Random(1))
    later = ks[50:]
    assert sum(k > 0 for k in later) >= 0.95 * len(later), ks
    assert sum(k == 0 for k in ks) >= PLAIN_TIMED  # plain steps were timed, to compare


def test_auto_comes_back_to_drafting_and_to_resting_when_acceptance_turns():
    """Losing, then paying (a stretch of code), then losing again: drafting resumes within two
    of the longest rests (three, where a try's draws are unlucky), and rests again within a few
    steps (then mostly rests). How soon it rests depends on the draws: by the expected figures,
    drafting's running rate falls below a plain step's after 6 losing steps (paying history
    1.5 tokens/ms, decaying 0.8 a step). Five seeds: the median and the worst are pinned."""
    first_rests, backs = [], []
    for seed in range(5):
        choice, rng = DraftLen(3, costs=model_says_cheap()), random.Random(seed)
        drive(choice, 300, LOSING, rng)
        paying = drive(choice, 200, PAYING, rng)
        back = next(i for i in range(len(paying)) if all(k > 0 for k in paying[i : i + 10]))
        backs.append(back)
        assert sum(k > 0 for k in paying[back:]) >= 0.95 * len(paying[back:])
        losing = drive(choice, 200, LOSING, rng)
        first_rests.append(losing.index(0))
        assert sum(k == 0 for k in losing[20:60]) >= 0.8 * 40, losing
        assert sum(k == 0 for k in losing[60:]) >= 0.9 * len(losing[60:])
    assert sorted(first_rests)[2] <= 8 and max(first_rests) <= 15, first_rests
    rest = LONGEST_REST + 1
    assert sorted(backs)[2] <= 2 * rest and max(backs) <= 3 * rest, backs


def clocked(c: list[float], monkeypatch, slope: float) -> CostModel:
    """A cost model that learns, on a fake clock that a trunk pass over q tokens advances by
    1 + slope × (q - 1) (nothing else takes time): the bare curve ``c`` given is wrong unless
    it says so."""
    from multitoken.decode import chain, phases

    clock = [0.0]
    trunk_pass = phases.trunk_pass

    def timed(model, ids, *args, **kwargs):
        clock[0] += 1.0 + slope * (ids.size(1) - 1)
        return trunk_pass(model, ids, *args, **kwargs)

    for module in (phases, chain):  # prefill, chain steps
        monkeypatch.setattr(module, "trunk_pass", timed)
    return CostModel(c, t1_s=1.0, prior_draft=0.0, clock=lambda: clock[0])


@pytest.mark.parametrize("slope, rests", [(1.5, True), (0.1, False)])
def test_right_heads_rest_when_the_clock_says_verifying_costs_more(monkeypatch, slope, rests):
    """Heads that are always right, a bare curve that says verifying is free: only the steps as
    timed (a pass over q tokens takes 1 + 1.5 (q - 1) t1) show that a plain step gives more
    tokens per second, and auto rests; at 1 + 0.1 (q - 1) it drafts all 4."""
    model = model_of("bpd")
    plain = generate(model, PROMPTS, max_new_tokens=100, speculate=False)
    model.heads = OracleHeads(model, wrong=False)
    cost = clocked([1.0] * 5, monkeypatch, slope)
    out = generate(model, PROMPTS, max_new_tokens=100, tree="chain", draft_len="auto", costs=cost)
    assert out.tokens == plain.tokens
    ks = out.stats.draft_lens[10:]
    if rests:
        assert sum(k == 0 for k in ks) >= 0.9 * len(ks), out.stats.draft_lens
    else:
        assert sum(k == 4 for k in ks) >= 0.9 * len(ks), out.stats.draft_lens
    # the next call starts where this one ended: resting (or drafting) from its first steps
    again = generate(model, PROMPTS, max_new_tokens=100, tree="chain", draft_len="auto", costs=cost)
    assert again.tokens == plain.tokens
    first = again.stats.draft_lens[:10]
    if rests:
        assert sum(k == 0 for k in first) >= 8, again.stats.draft_lens
    else:
        assert sum(k == 4 for k in first) >= 8, again.stats.draft_lens
