"""``--tree auto``: acceptance by depth and rank is counted where candidates were offered, the
tree a step verifies is the one with the most expected tokens per unit of time, and decoding
with it stays exact."""

from __future__ import annotations

import pytest
from test_generate import PROMPTS, trained
from test_tree_ladder import far_heads, sample_the_trunks_law

from multitoken.costs import CostModel
from multitoken.generate import generate
from multitoken.tree import Tree
from multitoken.tree_auto import RankAcceptance, TreeChoice, best_tree


def costs(c: list[float], draft: float = 0.0) -> CostModel:
    return CostModel(c, t1_s=1.0, prior_draft=draft, learn_draft=False)


def test_offers_and_hits_are_counted_where_the_path_went():
    tree = Tree.parse("2,1")  # nodes: 0; 1, 2 (depth 1, ranks 0, 1); 3, 4 (under 1, under 2)
    seen = RankAcceptance(depth=2, width=2, decay=1.0)
    seen.observe([tree] * 3, [[0, 2, 4], [0], [0, 1]])
    assert seen.offers == [[3.0, 3.0], [2.0, 0.0]]  # depth 2 offered under each kept node
    assert seen.hits == [[1.0, 1.0], [1.0, 0.0]]


def test_a_flat_cost_curve_buys_the_widest_tree_and_a_steep_one_a_plain_step():
    sure = [[0.9, 0.5, 0.3, 0.2]] * 3
    assert best_tree(sure, costs([1.0] * 40), 3, 20).size == 21
    doubtful = [[0.05, 0.02, 0.01, 0.01]] * 3
    assert best_tree(doubtful, costs([float(q) for q in range(1, 41)]), 3, 20).size == 1


def test_a_sure_first_candidate_and_hopeless_others_give_a_chain():
    a = [[0.95, 0.01, 0.01, 0.01]] * 3
    curve = [1.0 + 0.1 * (q - 1) for q in range(1, 41)]
    assert best_tree(a, costs(curve), 3, 20) == Tree.chain(3)


def test_drafting_is_tried_again_after_plain_steps():
    """Estimates decay towards the prior on plain steps too, so a run of misses does not lock
    a call into plain decoding."""
    choice = TreeChoice(depth=2, costs=costs([1.0, 1.6, 2.2, 2.8, 3.4, 4.0, 4.6]), max_nodes=6)
    for _ in range(30):  # every candidate offered and missed
        choice.observe([Tree.parse("2,1")], [[0]])
    assert choice.choose().size == 1
    plain = Tree.chain(0)
    steps = 0
    while choice.choose().size == 1 and steps < 500:
        choice.observe([plain], [[0]])
        steps += 1
    assert 0 < steps < 500


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_greedy_with_auto_trees_is_the_trunks_output(family):
    model = trained(family)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    cheap = costs([1.0 + 0.02 * q for q in range(40)], draft=0.05)
    out = generate(model, PROMPTS, max_new_tokens=24, tree="auto", costs=cheap)
    assert out.tokens == plain.tokens
    assert out.stats.tau > 1.5 and max(out.stats.draft_lens) == 3


def test_sampling_with_auto_trees_follows_the_trunks_law():
    cheap = costs([1.0] * 40)  # every tree is free: the widest the estimates allow
    out = sample_the_trunks_law(far_heads("bpd"), tree="auto", seed=7, costs=cheap)
    assert max(out.stats.draft_lens) == 2
