"""Tree drafting (multitoken.decode.trees.shape) on hand-made trees and distributions.

A tree's nodes are candidates for the tokens after the pending one; one trunk pass verifies them
all under a mask where each node sees the cache, its ancestors and itself. Greedy acceptance keeps
the deepest path of trunk argmaxes; sampled acceptance (SpecInfer / EAGLE-2 recursive rejection)
must emit exactly the trunk's own law, which the chi-square tests pin on a Markov "trunk" whose
next-token law depends on the node's token.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_chi_square_fits

from multitoken.decode.kvcache import position_mask
from multitoken.decode.sampling import accept_greedy_rows, accept_sampled_rows
from multitoken.decode.trees.accept import (
    accept_greedy_tree,
    accept_sampled_tree,
    sample_candidates,
)
from multitoken.decode.trees.shape import MAX_NODES, Tree, tree_attention_mask, tree_positions
from multitoken.errors import MultitokenError

MIN = torch.finfo(torch.float32).min

# A Markov "trunk" over 5 tokens: row a is the law of the token after a. Rows differ, so the
# two-token law is not a product of marginals.
TRUNK = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.12, 0.08],
        [0.05, 0.10, 0.50, 0.30, 0.05],
        [0.30, 0.30, 0.05, 0.05, 0.30],
        [0.10, 0.60, 0.10, 0.10, 0.10],
        [0.20, 0.05, 0.05, 0.20, 0.50],
    ]
)
# A deliberately wrong draft: it favours what the trunk rarely picks; row 3 is a point mass, so
# its second candidate is a token it cannot draw (acceptance must skip it).
WRONG = torch.tensor(
    [
        [0.05, 0.10, 0.15, 0.30, 0.40],
        [0.40, 0.30, 0.05, 0.05, 0.20],
        [0.05, 0.05, 0.60, 0.25, 0.05],
        [1.00, 0.00, 0.00, 0.00, 0.00],
        [0.25, 0.35, 0.30, 0.05, 0.05],
    ]
)
V = TRUNK.size(0)


def node_paths(path: torch.Tensor) -> list[list[int]]:
    """The acceptance rules' [B, D] kept nodes (-1 past a row's last) as node lists from the
    root."""
    return [[0, *(i for i in row if i >= 0)] for row in path.tolist()]


def greedy_paths(trees, tokens, target):
    path, bonus = accept_greedy_tree(trees, tokens, target)
    return node_paths(path), bonus


def sampled_paths(trees, tokens, p, q, generator):
    path, nxt = accept_sampled_tree(trees, tokens, p, q, generator)
    return node_paths(path), nxt


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- shapes ------------------------------------------------------------------------------------


def test_chain_is_one_child_per_node():
    tree = Tree.chain(3)
    assert tree.parent == (-1, 0, 1, 2)
    assert tree.depth == (0, 1, 2, 3) and tree.rank == (0, 0, 0, 0)
    assert (tree.size, tree.max_depth) == (4, 3)
    assert Tree.chain(0).size == 1 and Tree.chain(0).max_depth == 0


def test_parse_builds_the_full_product_tree_breadth_first():
    tree = Tree.parse("3,2,1")
    assert tree.size == 1 + 3 + 6 + 6
    assert [tree.depth.count(d) for d in range(4)] == [1, 3, 6, 6]
    assert tree.children[0] == (1, 2, 3)
    assert all(len(tree.children[i]) == 2 for i in (1, 2, 3))
    assert all(len(tree.children[i]) == 1 for i in range(4, 10))
    assert tree.rank[1:4] == (0, 1, 2) and tree.rank[4:10] == (0, 1) * 3
    paths = [p for d in (1, 2, 3) for p in itertools.product(*map(range, (3, 2, 1)[:d]))]
    assert Tree.from_paths(paths) == tree
    assert Tree.parse(" chain:4 ") == Tree.chain(4)


@pytest.mark.parametrize(
    "spec", ["", "3,x", "3,0", "3,,2", "2.5", "-1", "chain:0", "chain:x", "16,16", "chain:999"]
)
def test_parse_refuses_bad_specs_in_one_line(spec):
    with pytest.raises(MultitokenError) as caught:
        Tree.parse(spec)
    assert caught.value.flag == "--tree"
    assert "\n" not in caught.value.message and caught.value.message


def test_parse_caps_the_node_count():
    assert Tree.parse("15,16").size == 1 + 15 + 240 <= MAX_NODES
    with pytest.raises(MultitokenError, match="over 256"):
        Tree.parse("16,16")


def test_from_paths_orders_medusa_choices_and_keeps_their_ranks():
    paths = [(0, 0, 0), (1,), (0, 1), (0,), (1, 0), (0, 0)]
    tree = Tree.from_paths(paths)
    # breadth-first: (0,) (1,) | (0,0) (0,1) (1,0) | (0,0,0)
    assert tree.parent == (-1, 0, 0, 1, 1, 2, 3)
    assert tree.rank == (0, 0, 1, 0, 1, 0, 0)
    assert tree.path(6) == [0, 1, 3, 6]
    assert Tree.from_paths(sorted(paths)) == tree


@pytest.mark.parametrize(
    "paths, words",
    [
        ([(0,), (0, 0, 0)], "parent"),
        ([(0,), (0, 1)], "lower-ranked sibling"),
        ([(1,)], "lower-ranked sibling"),
        ([(0,), (0,)], "twice"),
        ([(0,), ()], "non-empty"),
        ([(0,), (0, -1)], "non-empty"),
    ],
)
def test_from_paths_refuses_broken_choices(paths, words):
    with pytest.raises(MultitokenError, match=words):
        Tree.from_paths(paths)


@pytest.mark.parametrize("parent", [(0,), (-1, 1), (-1, 0, 2), (-1, 0, 1, 0), ()])
def test_tree_refuses_parents_out_of_breadth_first_order(parent):
    with pytest.raises(MultitokenError):
        Tree(parent)


def test_ancestors_of_a_small_tree():
    tree = Tree.parse("2,1")  # 0 -> 1, 2;  1 -> 3;  2 -> 4
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestors(), expected)


# --- mask and positions ------------------------------------------------------------------------


def test_tree_mask_by_hand():
    tree = Tree.parse("2,1")  # depths 0 1 1 2 2
    keys = torch.tensor([[0, 1, 2], [-1, 0, 1]])  # row 1's first slot is a hole
    start = torch.tensor([3, 2])
    assert tree_positions(start, tree).tolist() == [[3, 4, 4, 5, 5], [2, 3, 3, 4, 4]]
    mask = tree_attention_mask(keys, start, tree, torch.float32)
    assert mask.shape == (2, 1, 5, 8)
    assert set(mask.unique().tolist()) == {0.0, MIN}
    new = tree.ancestors().int().tolist()
    for b, cache in enumerate(([1, 1, 1], [0, 1, 1])):
        expected = torch.tensor([cache + row for row in new], dtype=torch.bool)
        assert torch.equal(mask[b, 0] == 0, expected)


def test_tree_mask_window_counts_positions_in_cache_and_tree():
    tree = Tree.parse("2,1")
    keys, start = torch.tensor([[0, 1, 2]]), torch.tensor([3])
    seen = tree_attention_mask(keys, start, tree, torch.float32, window=2)[0, 0] == 0
    # node 3 (position 5, depth 2) sees itself and node 1 (position 4), not the root (3)
    assert seen[3, 3:].tolist() == [False, True, False, True, False]
    # node 1 (position 4) sees the root (3) and itself, not the cache's position 2
    assert seen[1].tolist() == [False, False, False, True, True, False, False, False]


@pytest.mark.parametrize("window", [None, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_mask_is_the_position_mask(window, dtype):
    K = 3
    keys = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 0, 1, -1], [0, -1, 1, 2, 3]])
    start = torch.tensor([5, 2, 4])
    queries = start[:, None] + torch.arange(K + 1)
    expected = position_mask(torch.cat([keys, queries], 1), queries, window, dtype)
    got = tree_attention_mask(keys, start, Tree.chain(K), dtype, window)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("window", [None, 2])
def test_one_tree_per_row_gives_each_row_its_own_mask_positions_and_paths(window):
    """Per-row trees (dynamic trees) of one node count: every row's mask, positions, greedy
    path and sampled path are what that row gets with its tree given for the whole batch."""
    trees = [Tree.parse("4"), Tree.chain(4), Tree.from_paths([(0,), (1,), (0, 0), (1, 0)])]
    keys = torch.tensor([[0, 1, 2], [-1, 0, 1], [0, 1, -1]])
    start = torch.tensor([3, 2, 2])
    mask = tree_attention_mask(keys, start, trees, torch.float32, window)
    positions = tree_positions(start, trees)
    g = gen(4)
    tokens = torch.randint(0, 3, (3, 5), generator=g)
    target = torch.randint(0, 3, (3, 5), generator=g)
    path, bonus = greedy_paths(trees, tokens, target)
    p = torch.softmax(torch.randn(3, 5, V, generator=g), -1)
    sampled, nxt = sampled_paths(trees, tokens, p, None, gen(5))
    for b, tree in enumerate(trees):
        alone = tree_attention_mask(keys, start, tree, torch.float32, window)
        assert torch.equal(mask[b], alone[b])
        assert torch.equal(positions[b], tree_positions(start, tree)[b])
        row_path, row_bonus = greedy_paths(tree, tokens, target)
        assert path[b] == row_path[b] and bonus[b] == row_bonus[b]
        assert all(tree.parent[i] == sampled[b][j] for j, i in enumerate(sampled[b][1:]))
    assert len({tuple(p) for p in path}) > 1  # the rows went different ways


# --- greedy acceptance -------------------------------------------------------------------------


def test_greedy_chain_equals_accept_greedy_rows():
    g = gen(3)
    K, B = 4, 64
    tokens = torch.randint(0, 3, (B, K + 1), generator=g)  # 3 tokens: long matches happen
    target = torch.randint(0, 3, (B, K + 1), generator=g)
    path, bonus = greedy_paths(Tree.chain(K), tokens, target)
    m = accept_greedy_rows(tokens[:, 1:], target)
    assert [len(row) - 1 for row in path] == m.tolist()
    assert set(m.tolist()) >= {0, 1, 2}  # the comparison covers several lengths
    assert all(row == list(range(len(row))) for row in path)
    assert torch.equal(bonus, target[torch.arange(B), m])


def test_greedy_tree_takes_the_second_ranked_candidate():
    tree = Tree.parse("2,1")  # 0 -> 1, 2;  1 -> 3;  2 -> 4
    tokens = torch.tensor([[7, 10, 11, 20, 21]])
    target = torch.tensor([[11, 30, 21, 40, 42]])  # the trunk wants 11, then 21, then 42
    path, bonus = greedy_paths(tree, tokens, target)
    assert path == [[0, 2, 4]] and bonus.tolist() == [42]
    # the chain of rank-0 drafts (10, 20) accepts nothing
    assert accept_greedy_rows(tokens[:, [1, 3]], target[:, [0, 1, 3]]).tolist() == [0]


def test_greedy_tree_rows_accept_different_lengths():
    tree = Tree.parse("2,2")  # 0 -> 1, 2;  1 -> 3, 4;  2 -> 5, 6
    tokens = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5, 6],
            [9, 1, 2, 3, 4, 5, 6],
            [9, 1, 2, 3, 4, 5, 6],
            [9, 1, 2, 3, 4, 5, 6],
        ]
    )
    target = torch.tensor(
        [
            [8, 0, 0, 0, 0, 0, 0],  # nothing: bonus 8
            [2, 0, 7, 0, 0, 0, 0],  # node 2, then a miss: bonus 7
            [1, 4, 0, 0, 33, 0, 0],  # nodes 1, 4 (second child): bonus 33
            [2, 0, 6, 0, 0, 0, 44],  # nodes 2, 6: bonus 44
        ]
    )
    path, bonus = greedy_paths(tree, tokens, target)
    assert path == [[0], [0, 2], [0, 1, 4], [0, 2, 6]]
    assert bonus.tolist() == [8, 7, 33, 44]


def test_greedy_tree_ties_go_to_the_lowest_index():
    tree = Tree.parse("2,1")
    tokens = torch.tensor([[9, 5, 5, 6, 6]])  # two siblings with one token, each a child 6
    target = torch.tensor([[5, 6, 6, 1, 2]])
    path, bonus = greedy_paths(tree, tokens, target)
    assert path == [[0, 1, 3]] and bonus.tolist() == [1]
    # when only the second sibling's subtree goes deeper, the deeper path wins
    tokens = torch.tensor([[9, 5, 5, 4, 6]])
    path, bonus = greedy_paths(tree, tokens, target)
    assert path == [[0, 2, 4]] and bonus.tolist() == [2]


# --- sampled acceptance ------------------------------------------------------------------------


def grow(tree: Tree, rows: int, root: int, pick) -> tuple[torch.Tensor, ...]:
    """Fill ``tree`` for ``rows`` independent rows over the Markov trunk: node i's children are
    ``pick(WRONG[token_i], width)``; p[:, i] = TRUNK[token_i], q[:, i] = WRONG[token_i]."""
    N = tree.size
    tokens = torch.full((rows, N), root, dtype=torch.long)
    p, q = torch.empty(rows, N, V), torch.empty(rows, N, V)
    for i in range(N):  # breadth-first: node i's token is set before its children are drawn
        p[:, i], q[:, i] = TRUNK[tokens[:, i]], WRONG[tokens[:, i]]
        kids = list(tree.children[i])
        if kids:
            tokens[:, kids] = pick(q[:, i], len(kids))
    return tokens, p, q


def first_tokens(tokens, path, nxt, n: int, g) -> torch.Tensor:
    """[B, n] each row's first n emitted tokens; a row that emitted fewer draws the rest from
    the trunk, as the next decoding steps would."""
    emitted = [tokens[b, row[1:]].tolist() + [int(nxt[b])] for b, row in enumerate(path)]
    out = torch.tensor([(e + [-1] * n)[:n] for e in emitted])
    for j in range(1, n):
        extra = torch.multinomial(TRUNK[out[:, j - 1]], 1, generator=g).squeeze(1)
        out[:, j] = torch.where(out[:, j] < 0, extra, out[:, j])
    return out


def token_law(root: int, n: int) -> torch.Tensor:
    """[V ** n] the trunk's exact law of its next n tokens after ``root``, by enumeration."""
    law = TRUNK[root]
    for _ in range(n - 1):
        # [V ** j, V]: a prefix's next token follows the trunk after its last (index mod V)
        law = (law[:, None] * TRUNK[torch.arange(law.numel()) % V]).flatten()
    return law


def cell(x: torch.Tensor) -> torch.Tensor:
    """[B, n] token tuples -> [B] index into a flattened [V] * n table."""
    return (x * V ** torch.arange(x.size(1) - 1, -1, -1)).sum(1)


@pytest.mark.parametrize("drawn", [False, True], ids=["top-k", "sampled-q"])
@pytest.mark.parametrize("spec", ["2,2", "3,2"])
def test_sampled_tree_is_lossless_over_two_tokens(drawn, spec):
    tree, rows, root, g = Tree.parse(spec), 40_000, 0, gen(11)
    if drawn:
        tokens, p, q = grow(tree, rows, root, lambda d, k: sample_candidates(d, k, g))
    else:
        tokens, p, q = grow(tree, rows, root, lambda d, k: d.topk(k, dim=-1).indices)
        q = None  # chosen deterministically: point masses
    path, nxt = sampled_paths(tree, tokens, p, q, g)
    x = first_tokens(tokens, path, nxt, 2, g)
    assert_chi_square_fits(torch.bincount(cell(x), minlength=V**2).float(), token_law(root, 2))
    # the test reaches every kind of step: nothing kept, a lower-ranked child, two levels
    kept = [len(row) - 1 for row in path]
    assert min(kept) == 0 and max(kept) == 2
    assert any(tree.rank[row[1]] > 0 for row in path if len(row) > 1)
    assert any(tree.rank[row[2]] > 0 for row in path if len(row) > 2)


@pytest.mark.parametrize("drawn", [False, True], ids=["top-k", "sampled-q"])
def test_sampled_tree_is_lossless_over_three_tokens(drawn):
    """The third token is the bonus after two kept levels, or a later step's: all covered."""
    tree, rows, root, g = Tree.parse("2,2"), 60_000, 2, gen(5)
    pick = (lambda d, k: sample_candidates(d, k, g)) if drawn else None
    tokens, p, q = grow(tree, rows, root, pick or (lambda d, k: d.topk(k, dim=-1).indices))
    path, nxt = sampled_paths(tree, tokens, p, q if drawn else None, g)
    x = first_tokens(tokens, path, nxt, 3, g)
    assert_chi_square_fits(torch.bincount(cell(x), minlength=V**3).float(), token_law(root, 3))


def chain_law(drafts, q, p) -> torch.Tensor:
    """[(K + 1) * V] the exact law of (m, next) under speculative sampling of a fixed chain."""
    K = drafts.numel()
    out, reach = torch.zeros(K + 1, V), 1.0
    for j in range(K):
        a = min(1.0, float(p[j, drafts[j]] / q[j, drafts[j]]))
        rest = (p[j] - q[j]).clamp_min(0)
        if a < 1:  # a = 1 rejects never (and leaves no residual to normalise)
            out[j] = reach * (1 - a) * rest / rest.sum()
        reach *= a
    out[K] = reach * p[K]
    return out.flatten()


def test_sampled_chain_matches_accept_sampled_rows_in_law():
    K, rows = 2, 30_000
    drafts = torch.tensor([3, 1])
    q = WRONG[[0, 3]].clone()  # draft laws of d_1, d_2
    q[1] = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    p = TRUNK[[0, 3, 1]]  # the trunk's after the root, d_1, d_2
    law = chain_law(drafts, q, p)
    tokens = torch.cat([torch.tensor([0]), drafts]).expand(rows, K + 1)
    q_tree = torch.cat([q, torch.zeros(1, V)])  # node K is a leaf: no draft law
    path, nxt = sampled_paths(
        Tree.chain(K), tokens, p.expand(rows, -1, -1), q_tree.expand(rows, -1, -1), gen(2)
    )
    m = torch.tensor([len(row) - 1 for row in path])
    assert_chi_square_fits(torch.bincount(m * V + nxt, minlength=(K + 1) * V).float(), law)
    m, nxt = accept_sampled_rows(
        drafts.expand(rows, K), q.expand(rows, -1, -1), p.expand(rows, -1, -1), gen(2)
    )
    assert_chi_square_fits(torch.bincount(m * V + nxt, minlength=(K + 1) * V).float(), law)


def test_sampled_tree_follows_the_generator():
    tree = Tree.parse("2,2")
    tokens, p, q = grow(tree, 64, 1, lambda d, k: d.topk(k, dim=-1).indices)
    first = sampled_paths(tree, tokens, p, q, gen(9))
    again = sampled_paths(tree, tokens, p, q, gen(9))
    assert first[0] == again[0] and torch.equal(first[1], again[1])


def test_sampled_tree_accepts_what_the_trunk_is_sure_of():
    tree = Tree.parse("2,1")
    tokens = torch.tensor([[0, 1, 2, 3, 4]])
    p = torch.zeros(1, 5, V)
    p[0, 0, 2] = p[0, 2, 4] = p[0, 4, 0] = 1.0  # the trunk emits 2, 4, 0 for sure
    p[0, 1, 1] = p[0, 3, 1] = 1.0
    path, nxt = sampled_paths(tree, tokens, p, None, gen(0))
    assert path == [[0, 2, 4]] and nxt.tolist() == [0]


def test_sample_candidates_draws_without_replacement_in_order():
    q, rows = TRUNK[1], 40_000
    picks = sample_candidates(q.expand(rows, V), 2, gen(4))
    assert (picks[:, 0] != picks[:, 1]).all()
    law = q[:, None] * q[None, :] / (1 - q[:, None])  # q(a) q(b) / (1 - q(a)), b != a
    law.fill_diagonal_(0)
    assert_chi_square_fits(
        torch.bincount(picks[:, 0] * V + picks[:, 1], minlength=V * V).float(), law.flatten()
    )


# --- edge cases and a real trunk ---------------------------------------------------------------


def test_a_tree_without_drafts_emits_the_trunks_next_token():
    root = Tree.chain(0)
    tokens, target = torch.tensor([[5], [6]]), torch.tensor([[1], [2]])
    path, bonus = greedy_paths(root, tokens, target)
    assert path == [[0], [0]] and bonus.tolist() == [1, 2]
    p = torch.zeros(2, 1, V)
    p[0, 0, 3] = p[1, 0, 4] = 1.0
    path, nxt = sampled_paths(root, tokens, p, None, gen(0))
    assert path == [[0], [0]] and nxt.tolist() == [3, 4]


@torch.no_grad()
def test_one_tree_pass_gives_every_paths_own_logits():
    """The mask and positions in a real forward: node i's logits equal a plain forward of the
    prompt and the tokens on i's path (rows with different prompt lengths, one with a hole)."""
    from conftest import micro_llama
    from transformers import DynamicCache

    trunk, tree = micro_llama(), Tree.parse("2,2")
    g = gen(7)
    prompts = [torch.randint(3, 64, (6,), generator=g).tolist() for _ in range(2)]
    prompts[1] = prompts[1][:4]  # row 1 is shorter: its slots 0 and 1 are left padding (holes)
    keys = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]])
    ids = torch.tensor([prompts[0], [0, 0] + prompts[1]])
    cache = DynamicCache()
    trunk(
        input_ids=ids,
        cache=cache,
        use_cache=True,
        position_ids=keys.clamp_min(0),
        attention_mask=position_mask(keys, keys, None, torch.float32),
    )
    start = torch.tensor([6, 4])
    nodes = torch.randint(3, 64, (2, tree.size), generator=g)
    logits = trunk(
        input_ids=nodes,
        cache=cache,
        use_cache=True,
        position_ids=tree_positions(start, tree),
        attention_mask=tree_attention_mask(keys, start, tree, torch.float32),
    ).logits  # [2, N, vocab]
    for b in range(2):
        for i in range(tree.size):
            plain = trunk(torch.tensor([prompts[b] + nodes[b, tree.path(i)].tolist()])).logits
            torch.testing.assert_close(logits[b, i], plain[0, -1], atol=1e-5, rtol=1e-4)
