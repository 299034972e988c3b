"""The label shift and the λ weighting — the one place that says what each head predicts."""

import math

import pytest
import torch

from multitoken.training.losses import (
    IGNORE,
    OUTSIDE,
    cross_entropy,
    greedy_path_labels,
    shift_labels,
    soft_cross_entropy,
    soft_labels,
    trunk_top_k,
)


def test_shift_labels_matches_docstring_example():
    a, b, c, d, e = 10, 11, 12, 13, 14
    tokens = torch.tensor([[a, b, c, d, e]])
    assert shift_labels(tokens, 0).tolist() == [[b, c, d, e]]
    assert shift_labels(tokens, 1).tolist() == [[c, d, e, IGNORE]]
    assert shift_labels(tokens, 2).tolist() == [[d, e, IGNORE, IGNORE]]
    assert shift_labels(tokens, 4).tolist() == [[IGNORE] * 4]
    assert shift_labels(tokens, 9).tolist() == [[IGNORE] * 4]


def test_greedy_path_labels_match_docstring_example():
    a, b, c, d, e, x = 10, 11, 12, 13, 14, 19
    tokens, greedy = torch.tensor([[a, b, c, d, e]]), torch.tensor([[b, x, d, e]])
    assert greedy_path_labels(tokens, greedy, 1).tolist() == [[x, IGNORE, e, IGNORE]]
    assert greedy_path_labels(tokens, greedy, 2).tolist() == [[IGNORE] * 4]


def test_greedy_path_labels_are_the_text_where_the_text_is_the_greedy_path():
    # a row whose tokens from position 3 on are the trunk's greedy output: past the prompt the
    # greedy-path labels are the text's own; a broken step hides every label reaching over it
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (1, 13), generator=g)
    greedy = torch.randint(0, 50, (1, 12), generator=g)
    greedy[0, 3:] = tokens[0, 4:]  # the text follows the greedy path after position 3
    greedy[0, :3] = (tokens[0, 1:4] + 1) % 50  # ...and not before
    for k in (1, 2, 3):
        labels = greedy_path_labels(tokens, greedy, k)
        text = shift_labels(tokens, k)
        assert torch.equal(labels[0, 3:], text[0, 3:])
        assert (labels[0, :3] == IGNORE).all()
    greedy[0, 7] = (greedy[0, 7] + 1) % 50  # the text leaves the path at position 7
    labels = greedy_path_labels(tokens, greedy, 2)
    assert labels[0, 6].item() == labels[0, 7].item() == IGNORE  # their two steps cross 7
    assert labels[0, 5].item() == greedy[0, 7].item()  # its steps (5, 6) follow the path
    assert labels[0, 8].item() == greedy[0, 10].item()


def test_cross_entropy_by_hand():
    # Two positions, vocabulary 2; the second position has no label.
    logits = torch.tensor([[[0.0, 1.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, IGNORE]])
    loss, acc = cross_entropy(logits, labels)
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (1 + torch.exp(torch.tensor(1.0))))
    assert torch.allclose(loss, expected)
    assert acc.item() == 1.0


def test_head_weights_follow_each_paper():
    from multitoken.heads import head_class

    assert head_class("deepseek").loss_weights(4, 0.3) == [0.075] * 4  # λ / D (DeepSeek-V3 eq. 25)
    assert head_class("meta").loss_weights(3, 1.0) == [1.0] * 3  # sum of losses (Gloeckle 2024)
    assert head_class("bpd").loss_weights(2, 0.5) == [0.5, 0.5]


# --- soft labels (--labels soft) -----------------------------------------------------------------


def test_trunk_top_k_matches_docstring_example_and_is_the_renormalised_restriction():
    ids, probs = trunk_top_k(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2)
    assert ids.tolist() == [1, 2] and probs.tolist() == [0.5, 0.5]
    for dtype in (torch.float32, torch.bfloat16):  # the first id is the argmax, ties included
        logits = torch.randint(0, 4, (50, 9)).to(dtype)  # many ties
        ids, _ = trunk_top_k(logits, 3)
        assert torch.equal(ids[:, 0], logits.argmax(-1))
    logits = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    ids, probs = trunk_top_k(logits, 3)
    p = logits.softmax(-1)
    top = p.topk(3)
    assert torch.equal(ids, top.indices)
    want = top.values / top.values.sum(-1, keepdim=True)  # p restricted to its top 3, sum 1
    torch.testing.assert_close(probs, want, rtol=0, atol=2**-11)  # fp16 rounding only
    assert probs.dtype == torch.float32 and torch.equal(probs, probs.half().float())
    assert trunk_top_k(logits, 99)[0].shape == (2, 6, 5)  # k' = min(k, V)


def test_soft_labels_match_docstring_example():
    # top-2 at each of T = 4 positions: P_j = ids [10 + j, 20 + j], probs [0.75, 0.25]
    ids = torch.tensor([[[10 + j, 20 + j] for j in range(4)]])
    probs = torch.tensor([[[0.75, 0.25]] * 4], dtype=torch.float16)
    ids1, probs1 = soft_labels(ids, probs, 1)
    assert ids1.tolist() == [[[11, 21], [12, 22], [13, 23], [IGNORE, IGNORE]]]
    assert probs1.tolist() == [[[0.75, 0.25]] * 3 + [[0.0, 0.0]]] and probs1.dtype == torch.float32
    ids2, _ = soft_labels(ids, probs, 2)
    assert ids2[0, :, 0].tolist() == [12, 13, IGNORE, IGNORE]
    ids4, probs4 = soft_labels(ids, probs, 4)
    assert (ids4 == IGNORE).all() and (probs4 == 0).all()
    with pytest.raises(ValueError, match=">= 1"):
        soft_labels(ids, probs, 0)


def test_soft_cross_entropy_matches_docstring_example():
    logits = torch.tensor([[[0.0, 0.0, math.log(2)]]])  # q = [1/4, 1/4, 1/2]
    ids, probs = torch.tensor([[[2, 0]]]), torch.tensor([[[0.75, 0.25]]])
    loss, acc = soft_cross_entropy(logits, ids, probs)
    kl = 0.75 * math.log(1.5)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss.item() == pytest.approx(1.25 * math.log(2), rel=1e-6)
    assert loss.item() == pytest.approx(kl + entropy, rel=1e-6)
    assert acc.item() == 1.0
    # draft vocabulary {1, 2}: q over it, token 0 outside; p~ = [1] on token 2 (draft index 1)
    loss, acc = soft_cross_entropy(logits[..., 1:], torch.tensor([[[1, OUTSIDE]]]), probs)
    assert loss.item() == pytest.approx(-math.log(2 / 3), rel=1e-6) and acc.item() == 1.0
    # nothing inside, nothing labelled: no loss term, loss 0 and not NaN
    none = torch.tensor([[[OUTSIDE, OUTSIDE]]])
    loss, acc = soft_cross_entropy(logits, none, probs)
    assert loss.item() == 0.0 and acc.item() == 0.0  # the trunk's argmax is outside: a miss
    loss, acc = soft_cross_entropy(logits, torch.full_like(none, IGNORE), probs)
    assert loss.item() == 0.0 and acc.item() == 0.0


def by_hand(trunk: torch.Tensor, head: torch.Tensor, k: int, top: int, vocab=None):
    """Mean over positions i < T-k of KL(p~ || q) and H(p~), and the top-1 hits, computed from
    the definitions: p~ = the trunk's softmax at i+k over its ``top`` likeliest tokens that lie
    in ``vocab`` (default all), renormalised; q = the head's softmax at i over ``vocab``."""
    vocab = list(range(trunk.size(-1))) if vocab is None else vocab
    kls, entropies, hits = [], [], []
    for i in range(trunk.size(0) - k):
        p = trunk[i + k].double().softmax(-1)
        support = [t for t in p.argsort(descending=True)[:top].tolist() if t in vocab]
        hits.append(
            float(head[i].argmax().item() == vocab.index(p.argmax().item()))
            if p.argmax().item() in vocab
            else 0.0
        )
        if not support:
            continue
        pt = p[support] / p[support].sum()
        q = head[i].double().softmax(-1)[[vocab.index(t) for t in support]]
        kls.append(float((pt * (pt.log() - q.log())).sum()))
        entropies.append(float(-(pt * pt.log()).sum()))
    n = max(1, len(kls))
    return sum(kls) / n, sum(entropies) / n, sum(hits) / max(1, len(hits))


@pytest.mark.parametrize("top", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 2])
def test_soft_loss_is_the_kl_to_the_trunk_k_ahead_plus_its_entropy(k, top):
    # T = 4 positions, vocabulary 5: the head at position i against the trunk at i + k
    g = torch.Generator().manual_seed(k * 10 + top)
    trunk, head = torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    loss, acc = soft_cross_entropy(head, *soft_labels(*trunk_top_k(trunk, top), k))
    kl, entropy, hits = by_hand(trunk[0], head[0], k, top)
    assert loss.item() == pytest.approx(kl + entropy, abs=2e-3)  # fp16 probabilities
    assert acc.item() == pytest.approx(hits)
    # the loss moves exactly with the KL: its gradient is q - p~ (the entropy is constant)
    head.requires_grad_(True)
    ids, probs = soft_labels(*trunk_top_k(trunk, top), k)
    soft_cross_entropy(head, ids, probs)[0].backward()
    pt = torch.zeros(1, 4, 5).scatter_(-1, ids.clamp(min=0), probs)
    pt = pt / pt.sum(-1, keepdim=True).clamp(min=1e-30)
    valid = (ids[..., 0] != IGNORE).unsqueeze(-1)
    want = torch.where(valid, head.detach().softmax(-1) - pt, 0.0) / valid.sum()
    torch.testing.assert_close(head.grad, want, rtol=1e-5, atol=1e-6)


def test_soft_loss_over_a_draft_vocabulary_drops_the_mass_outside_and_renormalises():
    # vocabulary 5, draft vocabulary {0, 2, 3}; top-2 of the trunk. At position 2 the trunk's
    # top-2 are {1, 4}, both outside: that position has no loss term and is a miss.
    vocab = [0, 2, 3]
    trunk = torch.tensor(
        [
            [0.0, 1.0, 2.0, 0.5, -1.0],
            [2.0, 0.0, 1.0, 0.0, 0.0],
            [1.0, 3.0, 0.0, 0.0, 0.0],  # head 1 at position 1: top-2 {1 outside, 0 inside}
            [0.0, 3.0, 0.0, 0.0, 2.5],  # head 1 at position 2: top-2 {1, 4}, both outside
            [0.0, 0.0, 1.0, 3.0, 0.0],
        ]
    ).unsqueeze(0)
    head = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(3))
    lut = torch.full((5,), OUTSIDE)
    lut[vocab] = torch.arange(3)
    ids, probs = soft_labels(*trunk_top_k(trunk, 2), 1)
    ids = torch.where(ids == IGNORE, ids, lut[ids.clamp(min=0)])  # as DraftVocab.draft_labels
    assert ids[0, :4].tolist() == [[0, 1], [OUTSIDE, 0], [OUTSIDE, OUTSIDE], [2, 1]]
    loss, acc = soft_cross_entropy(head, ids, probs)
    kl, entropy, hits = by_hand(trunk[0], head[0], 1, 2, vocab)
    assert loss.item() == pytest.approx(kl + entropy, abs=2e-3)
    assert acc.item() == pytest.approx(hits)
    # position 1 keeps token 0 alone: its term is -log q(0), whatever p(1) was
    one, _ = soft_cross_entropy(head[:, 1:2], ids[:, 1:2], probs[:, 1:2])
    assert one.item() == pytest.approx(-head[0, 1].log_softmax(-1)[0].item(), rel=1e-6)
