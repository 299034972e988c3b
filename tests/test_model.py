"""MTPModel: a trunk that stays an ordinary causal LM, plus heads; its text API, stop tokens,
a frozen trunk kept in inference mode, and the guards of its training forward."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_llama, perturb_heads

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.text.tokenizer import ByteTokenizer
from multitoken.training.losses import OUTSIDE, soft_cross_entropy, soft_labels, trunk_top_k


def byte_model(family: str | None = "bpd") -> MTPModel:
    heads = None if family is None else HeadConfig(family=family, depth=2)
    return MTPModel(micro_llama(vocab=259), heads).eval()


def test_text_in_text_out_decodes_what_token_ids_decode():
    from multitoken.decode.api import generate

    model = byte_model()
    model.tokenizer = ByteTokenizer()
    texts, stats = model.generate(["ab", "xyz"], max_new_tokens=5, tree="chain", draft_len=2)
    ids = generate(model, [list(b"ab"), list(b"xyz")], max_new_tokens=5, tree="chain", draft_len=2)
    assert texts == [model.tokenizer.decode(t) for t in ids.tokens]
    assert stats["tokens"] == sum(map(len, ids.tokens)) and stats["tau"] >= 1


def test_text_api_without_a_tokenizer_is_one_line():
    with pytest.raises(MultitokenError, match="no tokenizer") as err:
        byte_model().generate("ab")
    assert err.value.flag == "tokenizer"


def test_stop_ids_join_the_tokenizers_eos_and_the_generation_configs():
    model = byte_model()
    model.tokenizer = ByteTokenizer()
    model.trunk.generation_config.eos_token_id = [7, 9]
    assert model.stop_ids() == {ByteTokenizer.eos_id, 7, 9}
    model.trunk.generation_config.eos_token_id = 11
    assert model.stop_ids() == {ByteTokenizer.eos_id, 11}


def test_a_model_without_heads_has_no_family_and_depth_zero():
    model = byte_model(None)
    assert model.heads is None and model.family == "none" and model.depth == 0


def test_a_frozen_trunk_stays_in_eval_while_the_heads_train():
    model = byte_model()
    model.trunk.requires_grad_(False)
    model.train()
    assert not model.trunk.training and model.heads.training
    model.trunk.requires_grad_(True)
    model.train()
    assert model.trunk.training


@pytest.mark.parametrize("labels", ["trunk", "soft"])
def test_labels_from_the_trunks_outputs_need_a_frozen_trunk(labels):
    model = byte_model()
    tokens = torch.randint(3, 250, (2, 9))
    with pytest.raises(RuntimeError, match="frozen trunk"):
        model(tokens, lam=1.0, labels=labels)
    model.trunk.requires_grad_(False)
    out = model(tokens, lam=1.0, labels=labels)
    assert out.head_losses.shape == (2,) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="unknown labels"):
        model(tokens, lam=1.0, labels="teacher")


@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_soft_labels_train_each_head_on_the_trunk_k_ahead_over_its_draft_vocabulary(draft_vocab):
    """model(labels="soft") is soft_cross_entropy of head k's logits against the trunk's top-k
    at i + k, mapped into the heads' draft vocabulary (tokens outside it dropped)."""
    config = HeadConfig(family="bpd", depth=2, draft_vocab=draft_vocab)
    model = MTPModel(micro_llama(vocab=64), config)
    if draft_vocab:
        ids = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:draft_vocab]
        model.heads.set_draft_vocab(ids)
    perturb_heads(model).trunk.requires_grad_(False)
    tokens = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens, lam=1.0, labels="soft", soft_top_k=8)
        trunk = model.trunk_forward(tokens[:, :-1])
        logits = model.heads(trunk.hidden)  # [D, B, T, N]
    topk = trunk_top_k(trunk.logits, 8)
    lut = torch.arange(64)
    if draft_vocab:
        lut = torch.full((64,), OUTSIDE)
        lut[model.heads.draft_ids] = torch.arange(draft_vocab)
    dropped = 0
    for k in (1, 2):
        ids, probs = soft_labels(*topk, k)
        mapped = torch.where(ids < 0, ids, lut[ids.clamp(min=0)])
        dropped += int((mapped == OUTSIDE).sum())
        loss, acc = soft_cross_entropy(logits[k - 1], mapped, probs)
        torch.testing.assert_close(out.head_losses[k - 1], loss)
        torch.testing.assert_close(out.head_acc[k - 1], acc)
    assert (dropped > 0) == bool(draft_vocab)  # the draft case does drop tokens
