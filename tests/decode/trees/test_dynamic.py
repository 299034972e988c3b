"""Dynamic trees (EAGLE-2's rule): each row's best ``budget`` nodes of a drafted skeleton by the
product of draft probabilities (:func:`prune_tree`), always a tree whose kept siblings are a
prefix of the ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import prune_tree

from multitoken.decode.trees.dynamic import skeleton
from multitoken.decode.trees.shape import MAX_NODES, Tree


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rank_paths(tree: Tree) -> list[tuple[int, ...]]:
    return [tuple(tree.rank[i] for i in tree.path(n)[1:]) for n in range(1, tree.size)]


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


def test_sure_and_impossible_drafts_keep_every_row_closed_under_parents_and_elders():
    """Ties everywhere (probability 1 and 0): a child never outranks its parent nor a younger
    sibling its elder, whatever the budget."""
    S = skeleton(3)
    gen_ = gen(4)
    probs = (torch.rand(3, S.size, generator=gen_) < 0.5).float()  # 1 or 0 each
    for budget in range(S.size):
        trees, kept = prune_tree(S, probs.log(), budget)
        for row in kept.tolist():
            assert all(S.parent[i] in row for i in row[1:])
            assert all(S.children[S.parent[i]][S.rank[i] - 1] in row for i in row[1:] if S.rank[i])
