"""Token choice and the acceptance rules (multitoken.decode.sampling), on hand-made distributions.

``probs`` applies temperature, then top-k, then top-p; greedy acceptance keeps the longest prefix
of drafts equal to the trunk's argmax; speculative sampling (Leviathan et al. 2023) accepts a draft
d with probability min(1, p(d) / q(d)) and otherwise draws from norm(max(p - q, 0)), so that what
it emits is distributed exactly as p (docs/design.md §Inference, step 3).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_chi_square_fits
from helpers import accept_greedy, accept_sampled, accept_typical

from multitoken.decode import sampling
from multitoken.decode.sampling import (
    Sampling,
    accept_greedy_rows,
    draw_tokens,
    probs,
)

P = torch.tensor([0.5, 0.3, 0.15, 0.05])  # a trunk distribution over a 4-token vocabulary
UNIT = Sampling(temperature=1.0)


def logits_of(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax at temperature 1 is ``p`` (zeros become -inf)."""
    return p.log()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- probs: temperature, top-k, top-p ---------------------------------------------------------


def test_temperature_one_gives_back_the_softmax_and_lower_temperatures_sharpen():
    torch.testing.assert_close(probs(logits_of(P), UNIT), P)
    sharp = probs(logits_of(P), Sampling(temperature=0.5))
    torch.testing.assert_close(sharp, P**2 / (P**2).sum())  # softmax(2 log p) = p^2 / sum p^2
    assert sharp[0] > P[0] and sharp[-1] < P[-1]


def test_greedy_is_temperature_zero():
    assert Sampling().greedy and Sampling(temperature=0.0, top_k=3).greedy
    assert not Sampling(temperature=0.7).greedy


def test_top_k_keeps_the_k_most_likely_tokens_renormalised():
    got = probs(logits_of(P), Sampling(temperature=1.0, top_k=2))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)


def test_top_k_at_or_above_the_vocabulary_is_off():
    for k in (4, 100):
        torch.testing.assert_close(probs(logits_of(P), Sampling(temperature=1.0, top_k=k)), P)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.01, 1),  # far below the largest probability: the argmax alone, never nothing
        (0.45, 1),  # the first token alone reaches it
        (0.6, 2),
        (0.81, 3),
        (0.999, 4),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p: float, kept: int):
    got = probs(logits_of(P), Sampling(temperature=1.0, top_p=top_p))
    want = torch.cat([P[:kept], torch.zeros(4 - kept)])
    torch.testing.assert_close(got, want / want.sum())


def test_top_p_works_on_unsorted_logits_and_batches():
    order = torch.tensor([2, 0, 3, 1])  # the same law, tokens shuffled
    rows = torch.stack([logits_of(P), logits_of(P[order])])
    got = probs(rows, Sampling(temperature=1.0, top_p=0.6))
    first = torch.tensor([0.625, 0.375, 0.0, 0.0])
    torch.testing.assert_close(got[0], first)
    torch.testing.assert_close(got[1], first[order])


def test_top_k_applies_before_top_p():
    # top-k 3 renormalises to [0.526, 0.316, 0.158], where two tokens already hold 0.842 >= 0.82;
    # top-p first would have kept three (0.5 + 0.3 < 0.82)
    got = probs(logits_of(P), Sampling(temperature=1.0, top_k=3, top_p=0.82))
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0]))


# --- draw_tokens -----------------------------------------------------------------------------------


def test_greedy_choice_is_the_argmax_with_no_distribution():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    tokens, q = draw_tokens(logits, Sampling(), gen())
    assert tokens.tolist() == [1, 0] and q is None


def test_sampled_choice_returns_the_distribution_it_drew_from():
    logits = torch.randn(2, 3, 16, generator=gen(1))
    setting = Sampling(temperature=0.8, top_k=5)
    tokens, q = draw_tokens(logits, setting, gen(2))
    assert tokens.shape == (2, 3)
    torch.testing.assert_close(q, probs(logits, setting))
    assert bool((q.gather(-1, tokens[..., None]) > 0).all())  # drawn inside the top-k
    again, _ = draw_tokens(logits, setting, gen(2))
    assert torch.equal(tokens, again)  # the generator alone decides


# --- greedy acceptance ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drafts", "target", "m"),
    [
        ([4, 5, 6], [4, 5, 6, 7], 3),  # all accepted: the bonus is the trunk's 4th token
        ([4, 5, 6], [4, 5, 9, 7], 2),
        ([4, 5, 6], [9, 5, 6, 7], 0),  # later matches after a miss do not count
        ([4], [4, 8], 1),
    ],
)
def test_greedy_acceptance_is_the_longest_matching_prefix_plus_the_trunks_token(
    drafts: list[int], target: list[int], m: int
):
    assert accept_greedy(torch.tensor(drafts), torch.tensor(target)) == (m, target[m])


def test_greedy_acceptance_rows_count_each_row_on_its_own():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    target = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [1, 2, 0, 4]])
    m = accept_greedy_rows(drafts, target)
    assert m.tolist() == [3, 0, 1, 2]
    for r in range(4):
        assert accept_greedy(drafts[r], target[r])[0] == int(m[r])


# --- speculative sampling ---------------------------------------------------------------------


def test_a_draft_from_the_trunks_own_distribution_is_always_accepted():
    p = torch.stack([P, P.flip(0), torch.tensor([0.0, 0.0, 0.0, 1.0])])  # [K + 1, V], K = 2
    for seed in range(200):
        drafts = torch.multinomial(p[:2], 1, generator=gen(seed)).view(2)
        m, nxt = accept_sampled(drafts, p[:2].clone(), p, gen(seed))
        assert (m, nxt) == (2, 3)  # both kept; the bonus comes from p[K], here one-hot on 3


def test_a_draft_the_trunk_gives_no_probability_is_always_rejected():
    p = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.2, 0.2, 0.3, 0.3]])
    for seed in range(200):
        m, nxt = accept_sampled(torch.tensor([2]), q, p, gen(seed))
        assert m == 0 and nxt in (0, 1)  # the replacement lies where p exceeds q


def test_a_rejection_after_accepted_drafts_stops_at_the_rejected_position():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m, nxt = accept_sampled(torch.tensor([1, 2]), q, p, gen())
    assert (m, nxt) == (1, 0)  # draft 1 kept, draft 2 (p = 0) replaced from the residual


def test_the_replacement_is_drawn_from_the_normalised_residual(monkeypatch):
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]])
    drawn_from: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(dist, *args, **kwargs):
        drawn_from.append(dist.clone())
        return real(dist, *args, **kwargs)

    monkeypatch.setattr(sampling.torch, "multinomial", spy)
    for seed in range(50):
        m, _ = accept_sampled(torch.tensor([1]), q, p, gen(seed))
        if m == 0:
            break
    else:
        pytest.fail("a draft accepted with probability 0.5 was never rejected in 50 tries")
    torch.testing.assert_close(drawn_from[-1].reshape(-1), torch.tensor([0.8, 0.0, 0.2, 0.0]))


def test_speculative_sampling_emits_exactly_the_trunks_distribution():
    """Draft from q, accept or replace: the first emitted token follows p, not q (chi-square at
    the 0.999 quantile with a fixed seed)."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    bonus = torch.full((6,), 1 / 6)
    g = gen(123)
    n = 6000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    counts = torch.zeros(6)
    for d in drafts.tolist():
        m, nxt = accept_sampled(torch.tensor([d]), q[None], torch.stack([p, bonus]), g)
        counts[d if m == 1 else nxt] += 1
    assert counts[4:].sum() == 0  # tokens the trunk never writes are never emitted
    assert_chi_square_fits(counts, p)


# --- typical acceptance (lossy, opt-in) -------------------------------------------------------


def test_typical_acceptance_keeps_drafts_above_eps_and_drops_impossible_ones():
    eps = 0.09
    confident = torch.tensor([0.97, 0.01, 0.01, 0.01])
    p = torch.stack([confident, P, torch.tensor([0.0, 0.0, 1.0, 0.0])])
    # p_j(d_j) above eps is always above the threshold min(eps, sqrt(eps) exp(-H)) ...
    assert accept_typical(torch.tensor([0, 0]), p, eps, gen()) == (2, 2)
    # ... and a draft the trunk gives probability 0 (or 0.01 < eps, at low entropy) is not
    assert accept_typical(torch.tensor([1, 0]), p, eps, gen())[0] == 0
    # P has entropy 1.14, so its threshold is eps itself (0.3 exp(-1.14) = 0.096): 0.05 fails,
    # and the next token is drawn from the trunk's own p at the first failing position
    m, nxt = accept_typical(torch.tensor([0, 3]), p, eps, gen())
    assert m == 1 and P[nxt] > 0


def test_the_goodness_of_fit_helper_catches_mass_where_the_law_puts_none_or_little():
    """tests/conftest.py's chi-square: exact draws pass; 4% of draws on a token of probability
    0, or 4% moved into the law's thin tail (cells expected under 5 times), fail."""
    g = torch.Generator().manual_seed(0)
    law = torch.tensor([0.5, 0.3, 0.1996, 0.0002, 0.0002, 0.0])
    n = 20_000
    exact = torch.bincount(torch.multinomial(law, n, True, generator=g), minlength=6)
    assert_chi_square_fits(exact, law)
    stray = exact.clone()
    stray[0] -= 800
    stray[5] += 800  # where the law puts nothing
    with pytest.raises(AssertionError, match="no mass"):
        assert_chi_square_fits(stray, law)
    tail = exact.clone()
    tail[0] -= 800
    tail[3] += 800  # into a cell expected 4 times
    with pytest.raises(AssertionError):
        assert_chi_square_fits(tail, law)
