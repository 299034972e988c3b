"""The label shift and the λ weighting — the one place that says what each head predicts."""

import torch

from multitoken.losses import IGNORE, cross_entropy, head_weights, shift_labels


def test_shift_labels_matches_docstring_example():
    a, b, c, d, e = 10, 11, 12, 13, 14
    tokens = torch.tensor([[a, b, c, d, e]])
    assert shift_labels(tokens, 0).tolist() == [[b, c, d, e]]
    assert shift_labels(tokens, 1).tolist() == [[c, d, e, IGNORE]]
    assert shift_labels(tokens, 2).tolist() == [[d, e, IGNORE, IGNORE]]
    assert shift_labels(tokens, 4).tolist() == [[IGNORE] * 4]
    assert shift_labels(tokens, 9).tolist() == [[IGNORE] * 4]


def test_cross_entropy_by_hand():
    # Two positions, vocabulary 2; the second position has no label.
    logits = torch.tensor([[[0.0, 1.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, IGNORE]])
    loss, acc = cross_entropy(logits, labels)
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (1 + torch.exp(torch.tensor(1.0))))
    assert torch.allclose(loss, expected)
    assert acc.item() == 1.0


def test_head_weights_follow_each_paper():
    assert head_weights("deepseek", 4, 0.3) == [0.075] * 4  # λ / D (DeepSeek-V3 eq. 25)
    assert head_weights("meta", 3, 1.0) == [1.0] * 3  # sum of head losses (Gloeckle 2024)
    assert head_weights("bpd", 2, 0.5) == [0.5, 0.5]
