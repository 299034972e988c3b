"""The label shift and the λ weighting — the one place that says what each head predicts."""

import torch

from multitoken.losses import (
    IGNORE,
    cross_entropy,
    greedy_path_labels,
    shift_labels,
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
