"""RaggedCache: rows that keep different counts share one cache; holes are masked by position,
compacted away, and rows can leave the batch — each without changing what any row attends to."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_deepseek, micro_llama

from multitoken.decode import kvcache
from multitoken.decode.kvcache import RaggedCache, position_mask, trunk_attention_mask

NEG = torch.finfo(torch.float32).min


def test_position_mask_by_hand():
    """Keys at positions [0, hole, 1, 2] and two queries at 3 and 4, window 3."""
    keys = torch.tensor([[0, -1, 1, 2, 3, 4]])
    queries = torch.tensor([[3, 4]])
    seen = position_mask(keys, queries, window=3, dtype=torch.float32)[0, 0] == 0
    assert seen.tolist() == [
        [False, False, True, True, True, False],  # 3 sees 1, 2, 3 (3 - 0 = 3 is outside)
        [False, False, False, True, True, True],  # 4 sees 2, 3, 4
    ]
    full = position_mask(keys, queries, window=None, dtype=torch.float32)[0, 0]
    assert (full == 0).tolist()[0] == [True, False, True, True, True, False]
    assert full.min() == NEG  # additive: dtype-min where hidden, as eager attention needs


def test_commit_tracks_holes_and_key_positions():
    kv = RaggedCache(batch=2, device=torch.device("cpu"))
    kv.commit([3, 3])
    assert kv.keep is None and kv.slots == 3  # equal counts: no mask needed
    kv.commit([2, 0])
    assert kv.slots == 5 and kv.keep.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    kv.commit([1, 2])  # the widest row decides the slots appended
    assert kv.key_positions().tolist() == [[0, 1, 2, 3, 4, 5, -1], [0, 1, 2, -1, -1, 3, 4]]


def forward(trunk, kv: RaggedCache, ids: torch.Tensor, start: list[int]) -> torch.Tensor:
    """One trunk pass of ``ids`` [B, q] over ``kv`` as decoding runs it; logits [B, q, V]."""
    begin = torch.tensor(start)
    options = {}
    if kv.ragged:
        options["position_ids"] = begin[:, None] + torch.arange(ids.size(1))
        options["attention_mask"] = trunk_attention_mask(kv, begin, ids.size(1), torch.float32)
    return trunk(input_ids=ids, cache=kv.cache, use_cache=True, **options).logits


def ragged(trunk) -> tuple[RaggedCache, list[int]]:
    """Two rows that kept 6 and 2 of 3 rounds of 3 slots: holes in the middle of row 1."""
    kv = RaggedCache(batch=2, device=torch.device("cpu"), config=trunk.config)
    lengths = [0, 0]
    g = torch.Generator().manual_seed(0)
    for counts in ([3, 1], [2, 0], [1, 1]):
        forward(trunk, kv, torch.randint(3, 64, (2, 3), generator=g), lengths)
        kv.commit(counts)
        lengths = [n + c for n, c in zip(lengths, counts)]
    return kv, lengths


@pytest.mark.parametrize("make", [micro_llama, micro_deepseek], ids=["llama", "deepseek-mla"])
@torch.no_grad()
def test_compaction_leaves_every_row_attending_to_the_same_entries(make):
    """DeepSeek-V3's MLA caches keys and values of different head sizes: both are moved."""
    trunk = make().eval()
    kv, lengths = ragged(trunk)
    assert kv.ragged and kv.slots == 6 and kv.kept == lengths
    probe = torch.tensor([[7, 8], [9, 10]])
    before = forward(trunk, kv, probe, lengths)
    kv.commit([0, 0])  # roll the probe back
    kv.compact()
    assert kv.slots == max(lengths) and kv.keep.sum(1).tolist() == lengths
    after = forward(trunk, kv, probe, lengths)
    torch.testing.assert_close(after, before)  # the same keys at the same positions


@torch.no_grad()
def test_a_row_leaving_changes_nothing_for_the_others():
    trunk = micro_llama().eval()
    kv, lengths = ragged(trunk)
    probe = torch.tensor([[7, 8], [9, 10]])
    both = forward(trunk, kv, probe, lengths)
    kv.commit([0, 0])
    kv.select(torch.tensor([1]))
    assert kv.batch == 1 and kv.kept == lengths[1:]
    alone = forward(trunk, kv, probe[1:], lengths[1:])
    torch.testing.assert_close(alone, both[1:])


def test_compaction_waits_until_it_frees_enough(monkeypatch):
    calls = []
    monkeypatch.setattr(RaggedCache, "compact", lambda self: calls.append(self.slots))
    kv = RaggedCache(batch=2, device=torch.device("cpu"))
    kv.commit([10, 10])
    for step in range(2 * kvcache.COMPACT_MIN_SLOTS - 1):
        kv.commit([1, 0] if step % 2 == 0 else [0, 1])  # each row skips every other slot
    assert not calls  # 15 slots would be freed: not yet
    kv.commit([0, 1])
    assert calls == [10 + 2 * kvcache.COMPACT_MIN_SLOTS]


@pytest.mark.parametrize(
    ("layer_types", "kinds"),
    [
        (None, None),
        (["sliding_attention", "full_attention"], {"sliding_attention", "full_attention"}),
    ],
)
def test_a_sliding_window_trunk_gets_masks_by_position(layer_types, kinds):
    """One mask where every layer slides (Mistral), one per layer kind where they mix (Qwen2's
    ``layer_types``); a trunk without a window keeps the 2-D padding mask."""
    from transformers import MistralConfig

    config = MistralConfig(sliding_window=4, layer_types=layer_types, num_hidden_layers=2)
    kv = RaggedCache(batch=2, device=torch.device("cpu"), config=config)
    kv.commit([3, 1])
    mask = trunk_attention_mask(kv, torch.tensor([3, 1]), 2, torch.float32)
    if kinds is None:
        assert mask.shape == (2, 1, 2, 5)
    else:
        assert set(mask) == kinds
        assert not torch.equal(mask["sliding_attention"], mask["full_attention"])
    config.sliding_window = None
    assert trunk_attention_mask(kv, torch.tensor([3, 1]), 2, torch.float32).shape == (2, 5)


@pytest.mark.parametrize("make", [micro_llama, micro_deepseek])
@torch.no_grad()
def test_reordering_the_new_slots_permutes_each_rows_entries_and_nothing_else(make):
    """A tree's accepted path moves to the front of the slots its verify pass appended, row by
    row; the slots cached before stay as they were. DeepSeek-V3's MLA caches keys and values
    of different widths."""
    trunk = make().eval()
    kv = RaggedCache(batch=2, device=torch.device("cpu"), config=trunk.config)
    forward(trunk, kv, torch.tensor([[5, 6], [9, 10]]), [0, 0])
    kv.commit([2, 2])
    forward(trunk, kv, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), [2, 2])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in kv.cache.layers]
    order = torch.tensor([[0, 2], [3, 0]])  # each row's first two new slots: what these held
    kv.reorder_new(order, q=4)
    for (keys, values), layer in zip(before, kv.cache.layers):
        for old, new in ((keys, layer.keys), (values, layer.values)):
            assert torch.equal(new[:, :, :2], old[:, :, :2])
            for b in range(2):
                assert torch.equal(new[b, :, 2:4], old[b, :, 2:][:, order[b]])
                assert torch.equal(new[b, :, 4:], old[b, :, 4:])  # past w: as it was
    kv.commit([2, 1])
    assert kv.slots == 4 and kv.kept == [4, 3]


@pytest.mark.parametrize("make", [micro_llama, micro_deepseek], ids=["llama", "deepseek-mla"])
@torch.no_grad()
def test_rows_joining_a_batch_attend_to_their_own_entries_only(make):
    """Continuous batching: a ragged batch (holes) and a plain one of other lengths join; every
    row's next logits are what they were in its own batch (padding is a trailing hole)."""
    trunk = make().eval()
    kv, lengths = ragged(trunk)
    newcomers = RaggedCache(batch=2, device=torch.device("cpu"), config=trunk.config)
    prompts = torch.tensor(
        [[11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    )
    forward(trunk, newcomers, prompts, [0, 0])
    newcomers.commit([9, 4])  # right padding: row 1's prompt is 4 tokens
    probe = torch.tensor([[7, 8], [9, 10], [11, 12], [13, 14]])
    before = torch.cat(
        [forward(trunk, kv, probe[:2], lengths), forward(trunk, newcomers, probe[2:], [9, 4])]
    )
    kv.commit([0, 0])
    newcomers.commit([0, 0])
    kv.extend(newcomers)
    assert kv.batch == 4 and kv.kept == lengths + [9, 4] and kv.slots == 9
    after = forward(trunk, kv, probe, lengths + [9, 4])
    torch.testing.assert_close(after, before)


@torch.no_grad()
def test_a_layer_cropped_to_no_slot_still_follows_the_rows():
    """A cache whose every slot was rolled back keeps a [B, H, 0, Dh] tensor per layer: rows
    leaving and joining must reshape it too, or the next forward's rows do not match."""
    trunk = micro_llama().eval()
    kv = RaggedCache(batch=3, device=torch.device("cpu"), config=trunk.config)
    forward(trunk, kv, torch.tensor([[5, 6], [7, 8], [9, 10]]), [0, 0, 0])
    kv.commit([0, 0, 0])  # nothing kept: cropped to no slot
    kv.select(torch.tensor([0, 2]))
    kv.extend(RaggedCache(batch=2, device=torch.device("cpu"), config=trunk.config))
    logits = forward(trunk, kv, torch.tensor([[5], [9], [3], [4]]), [0, 0, 0, 0])
    alone = trunk(torch.tensor([[5], [9], [3], [4]])).logits
    torch.testing.assert_close(logits, alone)
