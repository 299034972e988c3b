"""``--tree auto``: the node budget of each step maximises expected tokens per unit of time under
the measured costs and the calibrated draft probabilities, resting from drafting when the whole
steps timed say a plain step does better (the drafting of every skeleton node included), and
decoding with it stays exact."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import PROMPTS, costs, far_heads, sample_the_trunks_law

from multitoken.decode.api import generate
from multitoken.decode.costs import CostModel
from multitoken.decode.pace import LONGEST_REST
from multitoken.decode.trees.budget import Calibration, RankScale, StepCosts, TreeBudget
from multitoken.decode.trees.dynamic import keep_best, path_values, skeleton
from multitoken.decode.trees.shape import Tree


def values_of(tree: Tree, probs: list[list[float]]) -> torch.Tensor:
    """Path values [B, N] of rows of per-node acceptance chances."""
    return path_values(tree, torch.tensor(probs).log())


def test_calibration_learns_how_often_candidates_of_a_probability_are_accepted():
    cal = Calibration(decay=1.0)
    fresh = cal(torch.tensor([0.85, 0.03])).tolist()
    assert fresh[0] > 0.85 and fresh[1] > 0.3  # the heads at their word, or hopeful
    for _ in range(300):  # over-confident at 0.85: right 4 times in 10
        cal.observe(torch.full((10,), 0.85), torch.arange(10) < 4)
    assert cal(torch.tensor([0.85])).item() == pytest.approx(0.4, abs=0.01)
    assert cal(torch.tensor([0.03])).tolist() == pytest.approx(fresh[1:])  # another bucket
    for _ in range(300):  # under-confident at 0.03: right half the time
        cal.observe(torch.full((2,), 0.03), torch.tensor([True, False]))
    assert cal(torch.tensor([0.03])).item() == pytest.approx(0.5, abs=0.02)


def test_a_flat_cost_curve_buys_every_node_and_a_steep_one_a_plain_step():
    S = skeleton(3)
    v = values_of(S, [[1.0] + [0.5] * (S.size - 1)])
    assert TreeBudget(costs([1.0] * 40), 3).budget(v) == 32
    doubtful = values_of(S, [[1.0] + [0.02] * (S.size - 1)])
    steep = TreeBudget(costs([float(q) for q in range(1, 41)], draft=0.1), 3)
    assert steep.budget(doubtful) == 0
    steep.pace.trying = True  # a try, after a rest: it verifies one draft at least
    assert steep.budget(doubtful) == 1


def test_a_learning_budget_verifies_a_chains_worth_until_drafting_steps_pay():
    """Slow start (multitoken.decode.pace): with costs that learn, the first trees are as small as the
    heads' chain, and they double with each drafting step timed at a plain step's rate or more,
    whatever the model promised; a step that did not pay leaves them as they are, and drafting
    that stops paying on the whole starts them small again."""
    S = skeleton(3)
    v = values_of(S, [[1.0] + [0.5] * (S.size - 1)])
    budget = TreeBudget(CostModel([1.0] * 40, t1_s=1.0, prior_draft=0.0), 3)
    sizes = []
    for tokens, seconds in ((4.0, 1.0),) * 5 + ((1.0, 2.0),):
        assert budget.drafts()
        sizes.append(budget.budget(v))
        budget.observe_step(tokens, seconds)  # against a plain step's one token a second
    assert sizes == [3, 3, 6, 12, 24, 32]  # the first step warms up: not counted
    assert budget.drafts() and budget.budget(v) == 32
    for _ in range(6):  # steps of one token in two seconds: drafting loses on the whole
        if budget.drafts():
            budget.budget(v)
        budget.observe_step(1.0, 2.0 if budget.drafting else 1.0)
    assert not budget.drafts() and budget.pace.growth == 0


def test_a_peaked_draft_is_verified_as_a_chain():
    S = Tree.parse("3,2,2")
    probs = [1.0] + [0.0] * (S.size - 1)
    for i in range(1, S.size):  # rank 0 is sure, the others hopeless
        probs[i] = 0.95 if S.rank[i] == 0 else 0.01
    v = values_of(S, [probs])
    curve = [1.0 + 0.1 * (q - 1) for q in range(1, 41)]
    n = TreeBudget(costs(curve), 3).budget(v)
    trees, _ = keep_best(S, v, n)
    assert trees[0] == Tree.chain(3)


def step(sizer: TreeBudget, S: Tree, q: list[float], right: bool) -> int:
    """One step of a sizer over one row whose every candidate has draft probability ``q`` and
    whose first-ranked candidates are all right (or none is); the budget it chose."""
    return drafting_step(sizer, S, q, right)[0]


def drafting_step(sizer: TreeBudget, S: Tree, q: list[float], right: bool) -> tuple[int, int]:
    """:func:`step`: the budget chosen and the tokens the row emitted."""
    scores = torch.tensor([q]).log()
    values = path_values(S, sizer.calibrate(scores))
    n = sizer.budget(values)
    trees, kept = keep_best(S, values, n)
    tree = trees[0]
    path = [0]
    while right and tree.children[path[-1]]:
        path.append(tree.children[path[-1]][0])
    sizer.observe(scores, kept, trees, [path])
    return n, len(path)


def test_over_confident_heads_get_smaller_trees_and_under_confident_ones_larger():
    S = skeleton(2)
    curve = [1.0 + 0.25 * (q - 1) for q in range(1, 41)]
    sure = TreeBudget(costs(curve), 2)
    budgets = [step(sure, S, [1.0] + [0.9] * (S.size - 1), right=False) for _ in range(40)]
    assert budgets[0] > 4 and budgets[-1] == 0  # claims 0.9, never right
    cheap = [1.0 + 0.05 * (q - 1) for q in range(1, 41)]
    shy = TreeBudget(costs(cheap), 2)
    claims = [1.0] + [0.03 if S.rank[i] == 0 else 0.005 for i in range(1, S.size)]
    budgets = [step(shy, S, claims, right=True) for _ in range(40)]
    assert budgets[-1] == 2  # the first-ranked claim 0.03, always right: a chain of 2


def test_one_doubtful_step_among_good_ones_verifies_no_draft_but_keeps_drafting():
    S = skeleton(2)
    sure = values_of(S, [[1.0] + [0.9 if S.rank[i] == 0 else 0.05 for i in range(1, S.size)]])
    doubtful = values_of(S, [[1.0] + [0.01] * (S.size - 1)])
    sizer = TreeBudget(costs([1.0 + 0.1 * (q - 1) for q in range(1, 41)], draft=0.1), 2)
    for _ in range(5):  # steps that drafted and gave 2.8 tokens each
        assert sizer.drafts() and sizer.budget(sure) >= 2
        sizer.observe_step(2.8, 1.0)
    assert sizer.drafts() and sizer.budget(doubtful) == 0  # these drafts are not worth places
    sizer.observe_step(1.0, 1.0)
    assert sizer.drafts()  # but drafting still pays on the whole


# Every first-ranked candidate claims 0.9, the others 0.05; the bare curve says nodes are cheap
CLAIMS = [1.0] + [0.9 if rank == 0 else 0.05 for rank in skeleton(2).rank[1:]]


def learning_sizer() -> TreeBudget:
    curve = [1.0 + 0.05 * (q - 1) for q in range(1, 41)]
    return TreeBudget(CostModel(curve, t1_s=1.0, prior_draft=0.02), 2)  # it learns


def drive(sizer: TreeBudget, steps: int, right: bool, drafting: float) -> list[int]:
    """``steps`` steps of ``sizer`` (one row, :data:`CLAIMS`, first-ranked candidates all right
    or none) timed whole: a plain step 1 s, a drafting step 1 + 0.05 n + ``drafting`` s (the
    skeleton's drafting). Each step's budget, -1 where it rested."""
    S, budgets = skeleton(2), []
    for _ in range(steps):
        if sizer.drafts():
            n, tokens = drafting_step(sizer, S, CLAIMS, right)
            sizer.observe_step(float(tokens), 1.0 + 0.05 * n + drafting)
        else:
            n = -1
            sizer.observe_step(1.0, 1.0)
        budgets.append(n)
    return budgets


def rested(budgets: list[int]) -> float:
    return sum(n < 0 for n in budgets) / len(budgets)


def test_auto_trees_rest_where_drafting_steps_cost_more_per_token_than_plain_ones():
    """Heads always right at depth 1 and 2 (3 tokens a step): at 1.4 s a drafting step pays, at
    3.6 s (drafting 2.5 s, as DeepSeek's modules at every node of a skeleton on a CPU) it does
    not, though the model, told drafting costs 0.02, thinks it does."""
    dear = learning_sizer()
    budgets = drive(dear, 300, right=True, drafting=2.5)
    assert rested(budgets[50:]) >= 0.9, budgets
    assert max(budgets[50:]) >= 1  # drafting is still tried now and then
    cheap = learning_sizer()
    budgets = drive(cheap, 300, right=True, drafting=0.3)
    assert rested(budgets[20:]) <= 0.05, budgets  # a plain step timed now and then
    assert min(n for n in budgets[20:] if n >= 0) == 2  # the chain of the two right drafts


def test_auto_trees_come_back_to_drafting_and_to_resting_when_the_heads_turn():
    """Heads never right, then always (a stretch they know), then never again: drafting resumes
    within two of the longest rests, and rests again within a few steps (then mostly rests)."""
    sizer = learning_sizer()
    wrong = drive(sizer, 310, right=False, drafting=0.3)  # ends mid-rest
    assert rested(wrong[50:]) >= 0.9, wrong
    right = drive(sizer, 200, right=True, drafting=0.3)
    back = next(i for i in range(len(right)) if all(n >= 1 for n in right[i : i + 10]))
    assert back <= 2 * (LONGEST_REST + 1), right
    assert rested(right[back:]) <= 0.05
    wrong = drive(sizer, 200, right=False, drafting=0.3)
    assert -1 in wrong[:10] and rested(wrong[10:50]) >= 0.8, wrong
    assert rested(wrong[50:]) >= 0.9, wrong


def test_rows_of_a_batch_share_one_budget_from_their_summed_gains():
    S = skeleton(2)
    sure = [1.0] + [0.9 if S.rank[i] == 0 else 0.05 for i in range(1, S.size)]
    hopeless = [1.0] + [0.01] * (S.size - 1)
    curve = [1.0 + 0.1 * (q - 1) for q in range(1, 41)]
    alone = TreeBudget(costs(curve), 2).budget(values_of(S, [sure]))
    both = TreeBudget(costs(curve), 2).budget(values_of(S, [sure, hopeless]))
    assert alone >= both >= 1


@pytest.mark.parametrize("per_node, rests", [(0.2, True), (0.002, False)])
def test_deepseek_drafting_at_every_node_is_what_decides_resting(
    monkeypatch, per_node, rests, trained
):
    """DeepSeek's modules run at every node of the skeleton: on a fake clock where that costs
    0.2 t1 a node (8 t1 for the 41 nodes of a 3-deep skeleton) the steps as timed rest, though
    the heads are good and the bare curve cheap; at 0.002 t1 a node they draft. Either way the
    output is the trunk's."""
    from multitoken.decode import chain, phases
    from multitoken.decode.trees import step

    model = trained("deepseek")
    plain = generate(model, PROMPTS, max_new_tokens=60, speculate=False)
    clock, trunk_pass, draft_tree = [0.0], phases.trunk_pass, model.heads.draft_tree

    def timed_pass(model, ids, *args, **kwargs):
        clock[0] += 1.0 + 0.02 * (ids.size(1) - 1)
        return trunk_pass(model, ids, *args, **kwargs)

    def timed_draft(state, step, K, tree, choose):
        clock[0] += per_node * tree.size
        return draft_tree(state, step, K, tree, choose)

    for module in (phases, chain, step):  # prefill, plain steps, tree steps
        monkeypatch.setattr(module, "trunk_pass", timed_pass)
    monkeypatch.setattr(model.heads, "draft_tree", timed_draft)
    curve = [1.0 + 0.02 * (q - 1) for q in range(1, 41)]
    cost = CostModel(curve, t1_s=1.0, prior_draft=0.0, clock=lambda: clock[0])
    out = generate(model, PROMPTS, max_new_tokens=60, tree="auto", costs=cost)
    assert out.tokens == plain.tokens
    batch = cost.for_batch(len(PROMPTS))  # drafting is learnt per batch size, in its units
    assert batch.draft(3) * batch.t1_s == pytest.approx(per_node * skeleton(3).size)  # a step's
    steps = len(out.stats.nodes)
    drafted = out.stats.draft_steps
    if rests:
        assert steps - drafted >= 0.85 * steps, out.stats.nodes  # the first steps draft
    else:
        assert drafted >= 0.9 * steps and out.stats.tau > 1.5, out.stats.nodes
    # a second call goes on from what the first learnt, instead of drafting to find out again
    again = generate(model, PROMPTS, max_new_tokens=60, tree="auto", costs=cost)
    assert again.tokens == plain.tokens
    if rests:
        assert again.stats.draft_steps < drafted and again.stats.draft_steps <= 2
    else:
        assert again.stats.draft_steps >= 0.9 * len(again.stats.nodes)


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_greedy_with_auto_trees_is_the_trunks_output(family, trained):
    model = trained(family)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    cheap = costs([1.0 + 0.02 * q for q in range(40)], draft=0.05)
    out = generate(model, PROMPTS, max_new_tokens=24, tree="auto", costs=cheap)
    assert out.tokens == plain.tokens
    assert out.stats.tau > 1.5 and max(out.stats.draft_lens) == 3
    assert len(set(out.stats.nodes)) > 1  # the budget follows the draft's confidence


def test_auto_trees_rest_from_hopeless_heads_and_stay_exact():
    model = far_heads("bpd")
    prompts = [[1, 2, 3], [3, 2]]
    plain = generate(model, prompts, max_new_tokens=40, speculate=False)
    steep = costs([float(q) for q in range(1, 41)], draft=0.2)
    out = generate(model, prompts, max_new_tokens=40, tree="auto", costs=steep)
    assert out.tokens == plain.tokens
    assert out.stats.draft_steps < len(out.stats.nodes) / 2  # mostly plain steps


def test_sampling_with_auto_trees_follows_the_trunks_law():
    cheap = costs([1.0] * 40)  # every node is free: the widest tree the skeleton has
    out = sample_the_trunks_law(far_heads("bpd"), tree="auto", seed=7, costs=cheap)
    assert max(out.stats.draft_lens) == 2 and max(out.stats.nodes) > 4


def test_step_costs_fit_a_line_through_the_steps_timed():
    model = costs([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6], draft=0.0)
    model.learn_draft, model.t1_s = True, 0.01
    steps = StepCosts(model, draft_tokens=2, n_max=6)
    assert steps().tolist() == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6])
    for _ in range(200):  # steps take 0.3 t1 more than the bare passes, and grow twice as fast
        for n in (1, 4):
            steps.observe(n, 0.01 * (0.3 + 1.0 + 2 * 0.1 * n))
    fitted = steps().tolist()
    for n, (fit, bare) in enumerate(zip(fitted, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6])):
        truth = 1.3 + 0.2 * n  # the prior (y = x) still pulls a little, so: much nearer truth
        assert abs(fit - truth) < 0.15 * abs(bare - truth)
    fixed = StepCosts(costs([1.0, 1.1, 1.2]), draft_tokens=2, n_max=2)
    fixed.observe(1, 5.0)  # a cost model given whole is kept as it is
    assert fixed().tolist() == pytest.approx([1.0, 1.1, 1.2])


def test_rank_scale_learns_how_each_rank_of_value_turns_out():
    scale = RankScale(decay=1.0)
    assert scale(6).tolist() == [1.0] * 6  # at their word before anything is seen
    v = torch.tensor([[0.9, 0.8, 0.5, 0.5, 0.4, 0.4]])
    for step in range(400):  # rank 1 right as claimed, ranks 3-4 a fifth as often
        hit = [step % 10 < 9, step % 10 < 8, step % 10 < 1, False, step % 10 < 2, False]
        scale.observe(v, torch.tensor([hit]))
    rho = scale(6).tolist()
    assert rho[0] == pytest.approx(1.0, abs=0.02) and rho[1] == pytest.approx(1.0, abs=0.02)
    assert rho[2] == rho[3] == pytest.approx(0.1, abs=0.02)  # one group: 0.1 / 1.0
    assert rho[4] == rho[5] == pytest.approx(0.25, abs=0.02)  # ranks 5-8: 0.2 / 0.8


def test_a_tail_of_nodes_that_is_never_accepted_stops_being_bought():
    """Every node claims 0.5 and only each step's best one is ever right: the budget, at first
    the whole skeleton, falls to that one node."""
    S = skeleton(2)
    sizer = TreeBudget(costs([1.0 + 0.05 * (q - 1) for q in range(1, 41)]), 2)
    scores = torch.full((1, S.size), 0.5).log()
    values = path_values(S, scores)
    budgets = []
    for _ in range(40):
        n = sizer.budget(values)
        trees, kept = keep_best(S, values, n)
        best = int(sizer.ranked[0][0, 0])  # the node of largest value
        path = [0] + ([kept[0].tolist().index(best)] if n else [])
        sizer.observe(scores, kept, trees, [path])
        budgets.append(n)
    assert budgets[0] == S.size - 1 and statistics.median(budgets[:10]) >= 4
    # the tail's record fades (decay), so now and then it is bought again, and dropped again
    assert statistics.median(budgets[-20:]) == 1
