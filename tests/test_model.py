"""MTPModel: a trunk that stays an ordinary causal LM, plus heads; its text API, stop tokens,
a frozen trunk kept in inference mode, and the guards of its training forward."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_llama

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.tokenizer import ByteTokenizer


def byte_model(family: str | None = "bpd") -> MTPModel:
    heads = None if family is None else HeadConfig(family=family, depth=2)
    return MTPModel(micro_llama(vocab=259), heads).eval()


def test_text_in_text_out_decodes_what_token_ids_decode():
    from multitoken.generate import generate

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


def test_labels_from_the_trunks_greedy_path_need_a_frozen_trunk():
    model = byte_model()
    tokens = torch.randint(3, 250, (2, 9))
    with pytest.raises(RuntimeError, match="frozen trunk"):
        model(tokens, lam=1.0, labels="trunk")
    model.trunk.requires_grad_(False)
    out = model(tokens, lam=1.0, labels="trunk")
    assert out.head_losses.shape == (2,) and torch.isfinite(out.loss)
