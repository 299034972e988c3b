"""Portable heads: saved alone, loaded onto the matching trunk, refused by any other."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import micro_llama, perturb_heads

from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.errors import MultitokenError
from multitoken.io.headfile import HEADS_FILE, HEADS_META, load_heads, save_heads, trunk_signature
from multitoken.model import MTPModel


def trained_like(family: str, seed: int = 0) -> MTPModel:
    return perturb_heads(MTPModel(micro_llama(seed), HeadConfig(family=family, depth=2)), seed)


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_heads_round_trip_onto_a_copy_of_the_trunk(tmp_path, family):
    model = trained_like(family)
    save_heads(model, tmp_path)
    meta = json.loads((tmp_path / HEADS_META).read_text())
    assert (meta["family"], meta["depth"], meta["vocab_size"]) == (family, 2, 64)
    # The file holds the heads only: no trunk tensor travels with them.
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / HEADS_FILE))) == set(model.heads.state_dict())

    loaded = load_heads(micro_llama(0), tmp_path)  # the same weights, built afresh
    for (name, a), b in zip(model.heads.state_dict().items(), loaded.heads.state_dict().values()):
        assert torch.equal(a, b), name
    prompts = [[5, 9, 11, 3, 7]]
    # a fixed tree: what the automatic modes choose depends on steps timed, not only the heads
    ours = generate(model, prompts, max_new_tokens=12, tree="dynamic:6")
    theirs = generate(loaded, prompts, max_new_tokens=12, tree="dynamic:6")
    assert ours.tokens == theirs.tokens
    assert (
        ours.stats.acceptance == theirs.stats.acceptance
        and ours.stats.trunk_passes == theirs.stats.trunk_passes
    )


def test_heads_for_another_trunk_are_refused_naming_the_field(tmp_path):
    save_heads(trained_like("deepseek"), tmp_path)
    wider = micro_llama(0, hidden=64)
    with pytest.raises(MultitokenError, match="hidden_size 32 \\(heads\\) vs 64 \\(trunk\\)"):
        load_heads(wider, tmp_path)
    other_vocab = micro_llama(0, vocab=80)
    with pytest.raises(MultitokenError, match="vocab_size 64 \\(heads\\) vs 80"):
        load_heads(other_vocab, tmp_path)


def test_heads_on_changed_weights_load_with_one_warning(tmp_path, caplog):
    save_heads(trained_like("bpd"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="multitoken"):
        load_heads(micro_llama(0), tmp_path)
    assert not caplog.records  # same weights: silent
    with caplog.at_level(logging.WARNING, logger="multitoken"):
        load_heads(micro_llama(1), tmp_path)  # same shapes, other weights ("fine-tuned")
    assert len(caplog.records) == 1 and "other weights" in caplog.records[0].getMessage()


def test_signature_ignores_dtype_but_not_weights():
    trunk = micro_llama(0)
    sig = trunk_signature(trunk)
    assert trunk_signature(micro_llama(0).to(torch.bfloat16))["fields"] == sig["fields"]
    assert trunk_signature(micro_llama(1))["weights_digest"] != sig["weights_digest"]
    with torch.no_grad():
        trunk.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert trunk_signature(trunk)["weights_digest"] != sig["weights_digest"]


def test_damaged_heads_files_are_one_line_errors(tmp_path):
    save_heads(trained_like("meta"), tmp_path)
    data = (tmp_path / HEADS_FILE).read_bytes()
    (tmp_path / HEADS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(MultitokenError, match="corrupt or truncated") as err:
        load_heads(micro_llama(0), tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / HEADS_META).write_text("{")
    with pytest.raises(MultitokenError, match="corrupt"):
        load_heads(micro_llama(0), tmp_path)
    with pytest.raises(MultitokenError, match="not a heads folder"):
        load_heads(micro_llama(0), tmp_path / "nothing")


def test_cli_refuses_heads_for_another_trunk_in_one_line(tmp_path, capsys):
    from multitoken.cli import main
    from multitoken.io.tokenizer_files import write_hf_tokenizer
    from multitoken.text.tokenizer import ByteTokenizer
    from multitoken.trunk import quiet_transformers

    save_heads(perturb_heads(MTPModel(micro_llama(0, vocab=300), HeadConfig("bpd", 2))), tmp_path)
    with quiet_transformers():
        micro_llama(0, hidden=64, vocab=300).save_pretrained(tmp_path / "other")
    write_hf_tokenizer(ByteTokenizer(), tmp_path / "other")
    args = ["generate", "--checkpoint", str(tmp_path / "other"), "--heads", str(tmp_path)]
    assert main([*args, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"multitoken: error: --heads: the heads in {tmp_path} were trained for another trunk: "
        "head_dim 8 (heads) vs 16 (trunk); hidden_size 32 (heads) vs 64 (trunk); "
        "intermediate_size 64 (heads) vs 128 (trunk)"
    ]
