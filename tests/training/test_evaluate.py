"""Held-out acceptance: the counts behind a_k and τ, and their alignment with the heads."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import micro_llama, perturb_heads

from multitoken.config import HeadConfig
from multitoken.model import MTPModel
from multitoken.training.evaluate import (
    acceptance_counts,
    acceptance_rates,
    evaluate,
    expected_accepted_length,
    head_guesses,
)
from multitoken.training.featcache import FeatureCache

a, b, c, d, e, f, x, y = 10, 11, 12, 13, 14, 15, 20, 21


def test_tau_is_one_plus_the_sum_of_the_products_of_the_rates():
    assert expected_accepted_length([0.5, 0.4]) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    assert expected_accepted_length([]) == 1.0
    assert expected_accepted_length([1.0, 1.0, 1.0]) == 4.0
    assert acceptance_rates(torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == [0.75, 0.0]


def test_chain_acceptance_by_hand():
    # the text is the greedy path: head k's label at i is the text k+1 ahead
    tokens = torch.tensor([[a, b, c, d, e, f]])  # T = 5
    greedy = torch.tensor([[b, c, d, e, f]])
    # head 1 labels (i = 0..3): c d e f -> right at 0, 2, 3; head 2 labels (0..2): d e f
    head1 = [c, x, e, f, y]
    head2 = [d, e, x, y, y]  # right at 0 and 1, but at 1 draft 1 was already wrong
    guesses = torch.tensor([head1, head2]).view(2, 1, 5, 1)
    counts = acceptance_counts(tokens, guesses, greedy)
    # draft 1: 4 known positions, 3 right; draft 2: known 0..2, draft 1 right at 0 and 2,
    # draft 2 right at 0 of those
    assert counts.tolist() == [[3.0, 4.0], [1.0, 2.0]]
    rates = acceptance_rates(counts)
    assert expected_accepted_length(rates) == pytest.approx(1 + 0.75 + 0.75 * 0.5)

    # a second token per node: d at position 1 for head 1, f at position 2 for head 2
    second1, second2 = [y, d, y, y, y], [y, y, f, y, y]
    wide = torch.stack([guesses[..., 0], torch.tensor([second1, second2]).view(2, 1, 5)], -1)
    assert acceptance_counts(tokens, wide, greedy).tolist() == [[4.0, 4.0], [3.0, 3.0]]


def test_positions_where_the_text_leaves_the_greedy_path_are_not_counted():
    tokens = torch.tensor([[a, b, c, d, e, f]])
    greedy = torch.tensor([[b, x, d, e, f]])  # at 1 the trunk wanted x, the text says c
    # head 1 at i needs the text to follow at i (greedy[i] == tokens[i+1]): known at 0, 2, 3
    # (label greedy[i+1]: x, e, f); head 2 needs i and i+1 followed: known at 2 only (f)
    guesses = torch.tensor([[x, y, e, f, y], [y, y, f, y, y]]).view(2, 1, 5, 1)
    assert acceptance_counts(tokens, guesses, greedy).tolist() == [[3.0, 3.0], [1.0, 1.0]]


def greedy_rows(model: MTPModel, batch: int = 8, length: int = 33) -> torch.Tensor:
    """Rows whose tokens after a 3-token prompt are the trunk's own greedy continuation."""
    prompts = torch.randint(3, 64, (batch, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.trunk.generate(
            prompts, max_new_tokens=length - 3, do_sample=False, pad_token_id=0
        )
    return out[:, :length]


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_first_draft_acceptance_is_head_one_top1_on_the_greedy_path(tmp_path, family):
    """Teacher-forced, a_1 is head 1's top-1 against the trunk's greedy path: the guesses line
    up with the labels the trunk-labelled loss uses, with and without the feature cache and
    through a draft vocabulary."""
    config = HeadConfig(family=family, depth=2)
    model = perturb_heads(MTPModel(micro_llama(0), config), seed=0, scale=0.3)
    model.trunk.requires_grad_(False)
    batch = greedy_rows(model)
    plain = contextlib.nullcontext
    live = evaluate(model, [batch], 1.0, plain, labels="trunk")
    assert live["accept"][0] == pytest.approx(live["head_acc"][0])
    assert live["tau"] == pytest.approx(expected_accepted_length(live["accept"]))
    assert live["tau_top3"] >= live["tau"]
    assert 0.0 < live["accept"][0] < 1.0  # the check has something to tell apart
    cache = FeatureCache(tmp_path, model, 1 << 30, storage="fp32")
    cached = evaluate(model, [batch], 1.0, plain, cache=cache, labels="trunk")
    assert cached["accept"] == live["accept"] and cached["tau"] == live["tau"]

    # a draft vocabulary: the heads' ids are mapped back to the trunk's, and a label outside
    # it is a miss, as the trunk-labelled accuracy counts it
    config = HeadConfig(family=family, depth=2, draft_vocab=40)
    small = perturb_heads(MTPModel(micro_llama(0), config), seed=0, scale=0.3)
    small.trunk.requires_grad_(False)
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:40]
    small.heads.set_draft_vocab(ids)
    guesses, greedy = head_guesses(small, batch, None, 3)
    assert guesses.shape == (2, *greedy.shape, 3)
    assert torch.isin(guesses, ids).all()
    drafted = evaluate(small, [batch], 1.0, plain, labels="trunk")
    assert drafted["accept"][0] == pytest.approx(drafted["head_acc"][0])
