"""Drafting reads what training taught (invariants 3 and 4 of docs/design.md), driven here without
the decoder: a batch whose rows differ in length and commit different counts every step, so the
heads' caches get holes (and are compacted), one row committing nothing for a step, and rows
leaving the batch in a new order midway. Every row's drafts must equal the argmax of the heads'
own teacher-forced training logits at the same positions, on a full-attention trunk and on a
sliding-window one, where holes must not shift the window (issue 9, items 1-3)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    argmax,
    committed,
    micro_llama,
    mistral,
    perturb_heads,
    teacher_forced,
    teacher_forced_logits,
)

from multitoken.config import HeadConfig
from multitoken.decode.kvcache import RaggedCache
from multitoken.decode.trees.shape import Tree
from multitoken.model import MTPModel

K = 3
WINDOW = 6  # the Mistral trunk's sliding window
TRUNKS = {"llama": micro_llama, "mistral": lambda: mistral(WINDOW)}


def head_caches(state) -> list[RaggedCache]:
    return state if isinstance(state, list) else state.caches


# deepseek-ttt: one module reused for drafts 2 and 3, trained so (--ttt-steps 2, the
# training-time test): its training logits past D must be what drafting past D computes
HEADS = {
    "meta": HeadConfig(family="meta", depth=K),
    "deepseek": HeadConfig(family="deepseek", depth=K),
    "deepseek-ttt": HeadConfig(family="deepseek", depth=1, ttt_steps=K - 1),
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("trunk", ["llama", "mistral"])
def test_drafts_of_ragged_rows_equal_teacher_forced_logits(heads, trunk, monkeypatch):
    model = perturb_heads(MTPModel(TRUNKS[trunk](), HEADS[heads]), 0, 0.3)
    assert model.trained_depth == K
    compactions = []
    compact = RaggedCache.compact
    monkeypatch.setattr(RaggedCache, "compact", lambda kv: compactions.append(compact(kv)))
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 64, (n,), generator=g) for n in (9, 2, 5)]  # prompt + pending
    start, state = [0, 0, 0], model.heads.new_draft_state(3)
    ragged = checked = 0
    with torch.no_grad():
        for step in range(14):
            if step == 7:  # the middle row leaves; the others swap places
                order = [2, 0]
                state = model.heads.select_draft_rows(state, torch.tensor(order))
                tokens, start = [tokens[r] for r in order], [start[r] for r in order]
            c = committed(model, tokens, start)
            drafts = model.heads.draft(state, c, K, argmax)[0].tolist()
            for ids, row, new in zip(tokens, drafts, c.new):
                if new:  # a row that committed nothing has nothing new to draft from
                    assert row == teacher_forced(model, ids, row), (step, ids.numel())
                    checked += 1
            ragged += any(kv.ragged for kv in head_caches(state))
            # each row in turn accepts every draft while the others accept none or one, so
            # every row gets holes, enough for the caches to be compacted
            some = torch.randint(1, 3, (len(tokens),), generator=g).tolist()
            accepted = [K + 1 if (step + r) % 3 == 0 else a for r, a in enumerate(some)]
            if step == 3:
                accepted[0] = 0  # a finished row still in the batch commits nothing
            start = [ids.numel() - 1 for ids in tokens]
            bonus = torch.randint(3, 64, (len(tokens),), generator=g).tolist()
            tokens = [
                torch.cat([ids, torch.tensor(row[: a - 1] + [b])]) if a else ids
                for ids, row, a, b in zip(tokens, drafts, accepted, bonus)
            ]
    assert checked >= 30 and ragged >= 5 and compactions  # holes were drafted over
    assert min(ids.numel() for ids in tokens) > 4 * WINDOW  # far past the window


def test_the_chain_drafts_the_same_count_every_step():
    """DeepSeek's state holds, for module k+1, the states module k committed: a step that left
    a module out would leave a gap, so a changed K is refused rather than drafted wrongly."""
    model = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=2))
    tokens = [torch.tensor([5, 6, 7, 8])]
    state = model.heads.new_draft_state(1)
    with torch.no_grad():
        model.heads.draft(state, committed(model, tokens, [0]), 2, argmax)
        tokens = [torch.cat([tokens[0], torch.tensor([9])])]
        with pytest.raises(ValueError, match="drafted 2 tokens before, not 3"):
            model.heads.draft(state, committed(model, tokens, [3]), 3, argmax)


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
@pytest.mark.parametrize("trunk", ["llama", "mistral"])
def test_tree_nodes_are_the_teacher_forced_candidates_under_their_path(family, trunk):
    """Every node's draft logits are head depth + 1's teacher-forced logits after the node's
    path (for DeepSeek's causal chain the path matters; for parallel heads it must not), and
    its children are their top candidates in rank order: ragged rows, one of them too short
    for the whole chain at first, rows accepting different paths, a row leaving midway."""
    model = perturb_heads(MTPModel(TRUNKS[trunk](), HeadConfig(family=family, depth=K)), 0, 0.3)
    tree = Tree.parse("2,2,1")
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(3, 64, (n,), generator=g) for n in (7, 2, 4)]  # prompt + pending
    start, state = [0, 0, 0], model.heads.new_draft_state(3)

    def top(logits: torch.Tensor, width: int) -> torch.Tensor:
        return logits.topk(width, dim=-1).indices

    checked = 0
    with torch.no_grad():
        for step in range(6):
            if step == 3:
                state = model.heads.select_draft_rows(state, torch.tensor([2, 0]))
                tokens, start = [tokens[r] for r in (2, 0)], [start[r] for r in (2, 0)]
            c = committed(model, tokens, start)
            nodes, logits, which = model.heads.draft_tree(state, c, K, tree, top)
            assert nodes.shape == (len(tokens), tree.size - 1)
            node_tokens = [[0, *row] for row in nodes.tolist()]
            for b, ids in enumerate(tokens):
                for v in range(tree.size):
                    if not tree.children[v]:
                        continue
                    path = [node_tokens[b][u] for u in tree.path(v)[1:]]
                    expected = teacher_forced_logits(model, ids, path)
                    got = logits[b, which[v]]
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                    kids = [node_tokens[b][u] for u in tree.children[v]]
                    assert kids == expected.topk(len(kids)).indices.tolist(), (step, b, v)
                    checked += 1
            # each row keeps a different root-to-node path, then the trunk's (random) token
            start = [ids.numel() - 1 for ids in tokens]
            ends = torch.randint(0, tree.size, (len(tokens),), generator=g).tolist()
            tokens = [
                torch.cat([ids, torch.tensor([row[u] for u in tree.path(end)[1:]] + [b])])
                for ids, row, end, b in zip(tokens, node_tokens, ends, [5, 6, 7])
            ]
    assert checked == 7 * (3 * 3 + 3 * 2)  # 7 nodes with children, over 15 row-steps
