"""Prompt lookup mergeded into the draft trees (``--tree dynamic:N+lookup``, ``auto+lookup``): the
continuation found in the row's own text follows the heads' candidates while they carry it and
hangs its own nodes after, competes for the budget by its measured acceptance, and decoding
with it stays exact."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, costs, far_heads, sample_the_trunks_law

from multitoken.decode.api import generate, make_plan
from multitoken.decode.trees.dynamic import node_log_chances
from multitoken.decode.trees.lookup import LookupRates, PromptLookup, continuation
from multitoken.decode.trees.shape import Tree
from multitoken.decode.trees.spec import DEFAULT_LOOKUP, Dynamic, lookup_len, parse_spec
from multitoken.errors import MultitokenError


def test_lookup_continues_the_most_recent_match_of_the_longest_suffix_and_its_period():
    text = [7, 1, 2, 3, 9, 9, 4, 2, 3, 5, 6, 8, 1, 2, 3]
    assert continuation(text, 4) == (3, [9, 9, 4, 2])  # "1 2 3" once before, at the start
    assert continuation(text, 2, longest=2) == (2, [5, 6])  # "2 3": its latest place
    assert continuation([4, 5, 6, 8, 6], 3) == (1, [8, 6, 8])  # only the last token recurs,
    assert continuation([3, 2, 2, 2], 4) == (2, [2, 2, 2, 2])  # and the text repeats itself
    assert continuation([4, 5, 6], 3) == (0, [])
    assert continuation([5], 3) == (0, [])


def test_lookup_matches_whole_tokens_only():
    # as bytes, 0 then 1 hold 16777216's four bytes across their boundary: not a match
    assert continuation([0, 1, 5, 16777216], 3) == (0, [])
    assert continuation([0, 16777216, 5, 16777216], 2) == (1, [5, 16777216])


@pytest.mark.parametrize(
    "spec, shape, length",
    [
        ("auto+lookup", "auto", DEFAULT_LOOKUP),
        ("dynamic:8+lookup:5", Dynamic(8), 5),
        ("dynamic:8", Dynamic(8), 0),
    ],
)
def test_tree_specs_take_a_lookup_part(spec, shape, length):
    assert parse_spec(spec) == shape and lookup_len(spec) == length


@pytest.mark.parametrize("spec", ["3,2+lookup", "chain:3+lookup", "auto+lookup:0", "auto+lookupx"])
def test_lookup_joins_only_per_row_trees_of_a_valid_length(spec):
    with pytest.raises(MultitokenError) as error:
        parse_spec(spec)
    assert error.value.flag == "--tree" and "lookup" in str(error.value)


def test_the_continuation_follows_the_heads_candidates_then_hangs_its_own_nodes():
    S = Tree.parse("2,1")  # root; 1, 2 at depth 1; 3 under 1, 4 under 2
    tokens = torch.tensor([[9, 20, 21, 30, 31]])  # row 0: the pending token is 9
    chances = node_log_chances(S, torch.tensor([[0.0, -1.0, -2.0, -1.0, -1.0]]))
    lookup = PromptLookup(3)
    context = [9, 21, 40, 41, 9]  # after 9 came 21, 40, 41: head node 2 carries 21
    merged = lookup.merge(S, tokens, chances, lookup.continue_texts([context]))
    assert merged.path == [[2, 6, 7]]  # node 2, then lookup's own nodes 5 + 1, 5 + 2
    assert merged.parent[0][1:] == [2, 6] and merged.tokens[0, 6:].tolist() == [40, 41]
    rate = lookup.rates.log_rates()[0][0]  # a 1-token match's first token
    assert merged.chances[0, 2].item() == pytest.approx(max(-2.0, rate))  # raised by lookup's rate
    assert merged.chances[0, 5].item() < -1e29  # lookup's own first node: carried by the heads
    values = merged.values()
    assert values[0, 7].item() == pytest.approx(
        values[0, 2].item() + merged.chances[0, 6].item() + merged.chances[0, 7].item()
    )
    trees, kept = merged.keep_best(values, 4)
    # the lookup path (2, 6, 7) beats head node 4's: breadth-first, parents before children
    assert kept.tolist() == [[0, 1, 2, 6, 7]]
    assert trees[0] == Tree((-1, 0, 0, 2, 3))
    assert merged.tokens.gather(1, kept).tolist() == [[9, 20, 21, 40, 41]]


def test_lookup_rates_learn_by_depth_and_match_length():
    rates = LookupRates(3, decay=1.0)
    fresh = rates.log_rates()
    for _ in range(200):  # 2-token matches: the first token right 9 times in 10, then 1 in 10
        rates.observe([(2, 0, True)] * 9 + [(2, 0, False), (2, 1, True)] + [(2, 1, False)] * 9)
    learnt = torch.tensor(rates.log_rates()).exp()
    assert learnt[1, 0].item() == pytest.approx(0.9, abs=0.02)
    assert learnt[1, 1].item() == pytest.approx(0.1, abs=0.02)
    assert rates.log_rates()[0] == fresh[0]  # other match lengths: untouched


def test_outcomes_count_offered_tokens_up_to_the_first_miss():
    S = Tree.parse("1")
    lookup = PromptLookup(3)
    found = lookup.continue_texts([[5, 6, 7, 8, 5]])
    merged = lookup.merge(S, torch.tensor([[5, 3]]), torch.zeros(1, 2), found)
    assert merged.path == [[2, 3, 4]]  # the head's 3 is not lookup's 6: lookup's own chain
    trees, kept = merged.keep_best(merged.values(), 4)
    tree_path = [0, *[kept[0].tolist().index(n) for n in (2, 3)]]  # 6, 7 accepted, 8 not
    assert merged.outcomes(kept, [tree_path]) == [(1, 0, True), (1, 1, True), (1, 2, False)]


REPEATING = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [3], [10, 11, 12, 13, 10, 11, 12, 13, 10]]


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
@pytest.mark.parametrize("spec", ["dynamic:4+lookup:6", "auto+lookup"])
def test_greedy_with_lookup_in_the_trees_is_the_trunks_output(family, spec, trained):
    model = trained(family)
    prompts = PROMPTS + REPEATING
    plain = generate(model, prompts, max_new_tokens=40, speculate=False)
    cheap = costs([1.0 + 0.05 * q for q in range(60)])
    out = generate(model, prompts, max_new_tokens=40, tree=spec, costs=cheap)
    assert out.tokens == plain.tokens


def test_lookup_carries_a_trunk_that_repeats_itself_past_hopeless_heads(monkeypatch):
    """Heads that are never right, a trunk whose greedy output cycles: the lookup nodes are
    what gets accepted, several a step, deeper than the heads draft."""
    model = far_heads("bpd")  # D = 2, vocabulary of 4: greedy output soon cycles
    prompt = [[1, 2, 3, 1, 2]]
    plain = generate(model, prompt, max_new_tokens=60, speculate=False)
    without = generate(model, prompt, max_new_tokens=60, tree="dynamic:4")
    out = generate(model, prompt, max_new_tokens=60, tree="dynamic:4+lookup:6")
    assert out.tokens == plain.tokens
    assert max(out.stats.draft_lens) > 2  # lookup's nodes go past the heads' depth
    assert len(out.stats.nodes) < 0.6 * len(without.stats.nodes)


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_sampling_with_lookup_in_the_trees_follows_the_trunks_law(family, monkeypatch):
    outcomes = []
    observe = LookupRates.observe

    def spy(self, step):
        outcomes.extend(step)
        observe(self, step)

    monkeypatch.setattr(LookupRates, "observe", spy)
    sample_the_trunks_law(far_heads(family), tree="dynamic:3+lookup:3", seed=11)
    hits = [hit for _, _, hit in outcomes]
    assert any(hits) and not all(hits)  # lookup's candidates were accepted and rejected


def test_decoding_verifies_auto_trees_with_lookup_unless_chains_are_asked_for(trained):
    model = trained("bpd")
    plan = make_plan(model, PROMPTS, max_new_tokens=16)  # --tree not given
    assert plan.tree.auto and plan.lookup == DEFAULT_LOOKUP and plan.tree.static is None
    chain = make_plan(model, PROMPTS, max_new_tokens=16, tree="chain", draft_len=2)
    assert chain.lookup == 0 and chain.tree is None
    assert chain.k_max == 2 and not chain.auto
    # typical acceptance verifies chains only
    typical = make_plan(model, PROMPTS, max_new_tokens=16, temperature=1.0, typical=0.2)
    assert typical.lookup == 0 and typical.tree is None
    plain = make_plan(model, PROMPTS, max_new_tokens=16, speculate=False)
    assert plain.tree is None and plain.lookup == 0
    with pytest.raises(MultitokenError, match="typical"):
        make_plan(model, PROMPTS, tree="auto", temperature=1.0, typical=0.2)
