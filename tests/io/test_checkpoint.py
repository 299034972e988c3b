"""Checkpoints (multitoken.io.checkpoint): what a save writes and points ``latest`` at, loads that
give back the same weights, one-line errors naming the flag for every kind of damage, and saves
that fail leaving the previous checkpoint whole and pointed to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import micro_llama
from helpers import BYTES, saved_run, trunk_folder

from multitoken.errors import MultitokenError
from multitoken.io.checkpoint import (
    FORMAT_VERSION,
    is_run_or_checkpoint,
    load_checkpoint,
    load_training_state,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from multitoken.model import MTPModel
from multitoken.text.tokenizer import ByteTokenizer


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def refused(flag: str, match: str, load, *args, **kwargs) -> MultitokenError:
    with pytest.raises(MultitokenError, match=match) as err:
        load(*args, **kwargs)
    assert err.value.flag == flag and "\n" not in err.value.message
    return err.value


def test_a_save_writes_a_step_folder_and_points_latest_at_it(tmp_path: Path):
    run = tmp_path / "run"
    saved_run(run, family="bpd", depth=1, step=42)
    ckpt = run / "checkpoints" / "step-0000042"
    assert (run / "latest").read_text() == "checkpoints/step-0000042\n"
    assert resolve_checkpoint(run) == ckpt and resolve_checkpoint(ckpt) == ckpt
    assert is_run_or_checkpoint(run) and is_run_or_checkpoint(ckpt)
    meta = read_meta(ckpt)
    assert meta["format"] == FORMAT_VERSION and meta["step"] == 42 and meta["trunk_ref"] is None
    assert meta["heads"]["family"] == "bpd" and meta["heads"]["depth"] == 1
    assert (ckpt / "trunk" / "config.json").is_file()  # a plain model folder, usable as --trunk
    assert not (ckpt / "optimizer.pt").exists()  # only written when given
    assert step_names(run) == ["step-0000042"]  # no hidden temporary left beside it


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_a_checkpoint_loads_back_the_same_model_and_tokenizer(tmp_path: Path, family: str):
    model = saved_run(tmp_path / "run", family=family, depth=2)
    loaded, tokenizer, meta = load_checkpoint(tmp_path / "run")
    assert loaded.family == family and meta["heads"]["depth"] == 2
    assert_same_weights(loaded.trunk, model.trunk)
    assert_same_weights(loaded.heads, model.heads)
    assert isinstance(tokenizer, ByteTokenizer)


def test_old_checkpoints_are_pruned_to_keep_and_a_step_saved_again_is_replaced(tmp_path: Path):
    run = tmp_path / "run"
    model = saved_run(run, family="bpd", depth=1, step=1)
    for step in (2, 3):
        save_checkpoint(run, step, model, ByteTokenizer(), {"step": step}, keep=2)
    assert step_names(run) == ["step-0000002", "step-0000003"]
    save_checkpoint(run, 3, model, ByteTokenizer(), {"again": True}, keep=2)
    assert step_names(run) == ["step-0000002", "step-0000003"]
    assert read_meta(resolve_checkpoint(run))["train_config"] == {"again": True}


def test_a_failed_save_leaves_the_last_checkpoint_whole_and_pointed_to(tmp_path: Path):
    run = tmp_path / "run"
    saved_run(run, family="bpd", depth=1, step=1)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    headless = MTPModel(micro_llama(0, vocab=BYTES), None)  # save_heads refuses it, mid-save
    refused("--checkpoint", "no heads", save_checkpoint, run, 2, headless, ByteTokenizer(), {})
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "latest").read_text() == "checkpoints/step-0000001\n"
    load_checkpoint(run)


def test_optimizer_and_trainer_state_round_trip_for_resume(tmp_path: Path):
    model = saved_run(tmp_path / "first", family="bpd", depth=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"step": 5, "data": {"skip": 3, "carry": [1, 2]}}
    ckpt = save_checkpoint(tmp_path / "run", 5, model, ByteTokenizer(), {}, optimizer, state)
    optim_state, trainer_state = load_training_state(ckpt)
    assert trainer_state == state
    assert optim_state["param_groups"][0]["lr"] == 1e-3
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])  # a killed writer's half file
    refused("--resume", "no usable optimizer", load_training_state, ckpt)
    refused("--resume", "no usable optimizer", load_training_state, tmp_path / "first")


def test_an_optimizer_file_that_is_not_a_torch_file_is_a_one_line_error(tmp_path: Path):
    model = saved_run(tmp_path / "first", family="bpd", depth=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = save_checkpoint(tmp_path / "run", 5, model, ByteTokenizer(), {}, optimizer, {})
    (ckpt / "optimizer.pt").write_bytes(b"not a torch file")
    refused("--resume", "no usable optimizer", load_training_state, ckpt)


# --- damage -----------------------------------------------------------------------------------


def test_paths_that_are_not_checkpoints_are_refused_naming_the_flag(tmp_path: Path):
    refused("--checkpoint", "no such checkpoint", resolve_checkpoint, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    refused(
        "--heads", "not a multitoken checkpoint", resolve_checkpoint, tmp_path / "empty", "--heads"
    )
    assert not is_run_or_checkpoint(tmp_path / "empty")
    # a plain model folder is a checkpoint only for decoding
    folder = trunk_folder(tmp_path / "plain")
    refused("--checkpoint", "not a multitoken checkpoint", load_checkpoint, folder)
    model, tokenizer, meta = load_checkpoint(folder, trunk_only_ok=True)
    assert model.heads is None and meta["heads"] is None
    assert tokenizer.encode("héllo ✓") == ByteTokenizer().encode("héllo ✓")  # its exported bytes


def test_a_plain_folder_without_its_tokenizer_is_refused(tmp_path: Path):
    folder = trunk_folder(tmp_path / "plain")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    refused("--checkpoint", "needs its tokenizer", load_checkpoint, folder, trunk_only_ok=True)


def test_latest_naming_a_missing_checkpoint_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    saved_run(run, family="bpd", depth=1)
    (run / "latest").write_text("checkpoints/step-0000099\n")
    refused("--checkpoint", "points to a missing checkpoint", load_checkpoint, run)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "corrupt or unreadable"),
        (json.dumps({"format": FORMAT_VERSION - 1}), f"not a format-{FORMAT_VERSION}"),
        (json.dumps([1, 2]), f"not a format-{FORMAT_VERSION}"),
    ],
)
def test_damaged_metadata_is_a_one_line_error(tmp_path: Path, content: str, says: str):
    run = tmp_path / "run"
    saved_run(run, family="bpd", depth=1)
    (resolve_checkpoint(run) / "multitoken.json").write_text(content)
    refused("--trunk", says, load_checkpoint, run, "--trunk")  # the caller's flag


def test_a_damaged_trunk_is_named_as_the_checkpoints(tmp_path: Path):
    run = tmp_path / "run"
    saved_run(run, family="bpd", depth=1)
    weights = next((resolve_checkpoint(run) / "trunk").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    refused("--checkpoint", "has a damaged trunk", load_checkpoint, run)


def test_heads_on_a_frozen_trunk_refer_to_it_instead_of_copying_it(tmp_path: Path):
    trunk = trunk_folder(tmp_path / "trunk", seed=3)
    model = saved_run(tmp_path / "scratch", family="deepseek", depth=1)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, ByteTokenizer(), {}, trunk_ref=trunk)
    assert not (ckpt / "trunk").exists()
    assert read_meta(ckpt)["trunk_ref"] == str(trunk.resolve())
    loaded, _, _ = load_checkpoint(tmp_path / "run")
    assert_same_weights(loaded.trunk, model.trunk)  # the same seed: the same trunk
    assert_same_weights(loaded.heads, model.heads)
    shutil.rmtree(trunk)
    refused("--checkpoint", "which is gone", load_checkpoint, tmp_path / "run")
