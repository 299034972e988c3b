"""Dynamic trees (EAGLE-2's rule): the best ``budget`` nodes by the product of draft
probabilities, over a table of ranks (:func:`dynamic_tree`) and per row over a drafted skeleton
(:func:`prune_tree`), always a tree whose kept siblings are a prefix of the ranks."""

from __future__ import annotations

import itertools

import pytest
import torch

from multitoken.errors import MultitokenError
from multitoken.tree import MAX_NODES, Tree
from multitoken.tree_dynamic import dynamic_tree, prune_tree, skeleton


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force_values(table: list[list[float]]) -> list[float]:
    D, k = len(table), len(table[0])
    return sorted(
        (
            sum(table[j][r] for j, r in enumerate(path))
            for d in range(1, D + 1)
            for path in itertools.product(range(k), repeat=d)
        ),
        reverse=True,
    )


def rank_paths(tree: Tree) -> list[tuple[int, ...]]:
    return [tuple(tree.rank[i] for i in tree.path(n)[1:]) for n in range(1, tree.size)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_tree_is_the_best_budget_nodes(seed):
    D, k = 3, 3
    probs = torch.rand(D, k, generator=gen(seed)).sort(dim=1, descending=True).values
    scores = (probs / probs.sum(1, keepdim=True)).log()
    table = scores.tolist()
    best = brute_force_values(table)
    for budget in range(len(best) + 2):
        tree = dynamic_tree(scores, budget)
        assert tree.size - 1 == min(budget, len(best))
        assert all(tree.parent[i] < i for i in range(1, tree.size))
        values = sorted(
            (sum(table[j][r] for j, r in enumerate(path)) for path in rank_paths(tree)),
            reverse=True,
        )
        assert values == pytest.approx(best[: tree.size - 1], abs=1e-9)


def test_dynamic_tree_of_a_peaked_draft_is_the_chain():
    scores = torch.tensor([[0.9, 0.06, 0.04]] * 4).log()
    assert dynamic_tree(scores, 4) == Tree.chain(4)
    assert dynamic_tree(scores, 0) == Tree.chain(0)
    # a flat second depth spends the budget on width there instead
    flat = torch.tensor([[0.9, 0.06, 0.04], [0.34, 0.33, 0.33]]).log()
    assert rank_paths(dynamic_tree(flat, 4)) == [(0,), (0, 0), (0, 1), (0, 2)]


def test_dynamic_tree_refuses_unsorted_scores_and_negative_budgets():
    with pytest.raises(ValueError, match="best first"):
        dynamic_tree(torch.tensor([[0.1, 0.9]]).log(), 2)
    with pytest.raises(MultitokenError):
        dynamic_tree(torch.tensor([[0.9, 0.1]]).log(), -1)


def test_skeleton_widths_and_cap():
    assert skeleton(1) == Tree.parse("4")
    assert skeleton(3) == Tree.parse("4,3,2")
    assert skeleton(4) == Tree.parse("4,3,2,2")
    deep = skeleton(12)
    assert deep.size <= MAX_NODES and deep.max_depth == 12


def path_value(tree: Tree, scores: list[float], node: int) -> float:
    return sum(scores[i] for i in tree.path(node)[1:])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prune_keeps_each_rows_best_nodes_as_a_tree(seed):
    """Rows of random scores, already non-increasing in rank (top-k candidates): each row keeps
    exactly its ``budget`` highest path values, closed under parents."""
    S = Tree.parse("3,2,2")
    B = 3
    raw = torch.rand(B, S.size, generator=gen(seed)).log()
    for i in range(1, S.size):  # elder siblings score at least as much
        if S.rank[i]:
            raw[:, i] = torch.minimum(raw[:, i], raw[:, S.children[S.parent[i]][S.rank[i] - 1]])
    for budget in (1, 4, 9, S.size - 1, S.size + 3):
        trees, kept = prune_tree(S, raw, budget)
        n = min(budget, S.size - 1)
        assert kept.shape == (B, n + 1)
        for b in range(B):
            row, scores = kept[b].tolist(), raw[b].tolist()
            assert row == sorted(row) and row[0] == 0
            assert all(S.parent[i] in row for i in row[1:])  # closed under parents
            values = sorted((path_value(S, scores, i) for i in range(1, S.size)), reverse=True)
            got = sorted((path_value(S, scores, i) for i in row[1:]), reverse=True)
            assert got == pytest.approx(values[:n])
            tree = trees[b]
            assert tree.size == n + 1
            for j, node in enumerate(row[1:], start=1):  # same depth, rank and parent
                assert tree.depth[j] == S.depth[node] and tree.rank[j] == S.rank[node]
                assert row[tree.parent[j]] == S.parent[node]


def test_prune_keeps_elder_siblings_of_sampled_candidates():
    """Sampled candidates are draws without replacement, in draw order: a younger sibling with a
    higher probability still needs its elders (the rejection tries draws in order)."""
    S = Tree.parse("3")
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.7]]).log()  # node 3 (third draw) is the likeliest
    trees, kept = prune_tree(S, scores, 1)
    assert kept.tolist() == [[0, 1]]
    trees, kept = prune_tree(S, scores, 2)
    assert kept.tolist() == [[0, 1, 2]]


def test_prune_of_peaked_rows_gives_each_its_own_shape():
    S = Tree.parse("2,2")  # nodes: 1, 2 at depth 1; 3, 4 under 1; 5, 6 under 2
    sure = [0.0, 0.99, 0.01, 0.99, 0.01, 0.5, 0.5]  # a chain down rank 0
    torn = [0.0, 0.5, 0.5, 0.9, 0.1, 0.9, 0.1]  # two paths
    trees, kept = prune_tree(S, torch.tensor([sure, torn]).log(), 2)
    assert kept.tolist() == [[0, 1, 3], [0, 1, 2]]
    assert trees[0] == Tree.chain(2) and trees[1] == Tree.parse("2")
