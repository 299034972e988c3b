"""The trainer end to end on a small corpus: losses fall for every family (main and each head),
resume continues the same loss curve (invariant 6), checkpoints round-trip."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import multitoken
from multitoken.config import TrainConfig
from multitoken.io.checkpoint import load_checkpoint
from multitoken.training.trainer import lr_at

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few real Python modules: enough structure to learn in a few dozen steps."""
    root = tmp_path_factory.mktemp("corpus")
    for name in (
        "textwrap.py",
        "string.py",
        "colorsys.py",
        "bisect.py",
        "keyword.py",
        "fnmatch.py",
        "glob.py",
        "shlex.py",
    ):
        shutil.copy(STDLIB / name, root / name)
    return root


def fast(corpus: Path, out: Path, **overrides) -> dict:
    options = dict(
        preset="tiny",
        data=[str(corpus)],
        out=str(out),
        seq_len=64,
        batch_size=8,
        max_steps=40,
        eval_every=40,
        eval_batches=2,
        log_every=1,
        save_every=20,
        val_fraction=0.3,
        lr=3e-3,
    )
    options.update(overrides)
    return options


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_main_and_every_head_loss_fall(corpus, tmp_path, family):
    result = multitoken.train(**fast(corpus, tmp_path / "run", family=family, depth=2))
    val = [m for m in read_metrics(tmp_path / "run") if m["split"] == "val"]
    first, last = val[0], val[-1]
    assert first["step"] == 0 and last["step"] == 40
    assert last["main_loss"] < first["main_loss"] - 0.5
    assert len(last["head_losses"]) == 2
    for before, after in zip(first["head_losses"], last["head_losses"]):
        assert after < before - 0.5
    assert result.checkpoint is not None and result.checkpoint.name == "step-0000040"
    train_lines = [m for m in read_metrics(tmp_path / "run") if m["split"] == "train"]
    keys = {"step", "loss", "main_loss", "head_losses", "head_acc", "lr", "tokens_per_s"}
    assert keys <= set(train_lines[0])


def test_resume_continues_the_same_loss_curve(corpus, tmp_path):
    options = fast(
        corpus, tmp_path / "a", family="deepseek", depth=2, max_steps=12, save_every=4, eval_every=6
    )
    multitoken.train(**options)

    def killed(step: int) -> None:
        if step == 10:  # after the step-8 checkpoint; steps 9-10 are lost with the process
            raise KeyboardInterrupt

    options_b = {**options, "out": str(tmp_path / "b")}
    with pytest.raises(KeyboardInterrupt):
        multitoken.train(**options_b, on_step=killed)
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoints/step-0000008"
    multitoken.train(**options_b, resume=True)

    def curve(out):
        return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in read_metrics(out)]

    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert [(m["step"], m["split"]) for m in a] == [(m["step"], m["split"]) for m in b]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        assert ma["split"] == mb["split"]
        for key in ma.keys() - {"split"}:
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-4), (key, ma, mb)


def test_checkpoint_round_trip_gives_the_same_logits(corpus, tmp_path):
    result = multitoken.train(
        **fast(corpus, tmp_path / "run", family="meta", depth=2, max_steps=3, save_every=3)
    )
    loaded = multitoken.load(tmp_path / "run")  # a run folder follows `latest`
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = result.model(tokens, lam=1.0), loaded(tokens, lam=1.0)
        la = result.model.trunk(tokens).logits
        lb = loaded.trunk(tokens).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    torch.testing.assert_close(a.head_losses, b.head_losses, rtol=0, atol=0)
    assert type(loaded.trunk).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"
    model, _tok, meta = load_checkpoint(result.checkpoint)
    assert meta["step"] == 3 and meta["heads"]["family"] == "meta"


def test_checkpoints_are_pruned_and_latest_is_newest(corpus, tmp_path):
    multitoken.train(
        **fast(
            corpus,
            tmp_path / "run",
            family="bpd",
            max_steps=6,
            save_every=2,
            keep_checkpoints=2,
            eval_every=6,
        )
    )
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000006"]  # no temporary folders left behind
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step-0000006"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_lambda_schedule_is_step_wise():
    sched = TrainConfig(mtp_lambda="0.3->0.1@0.5").lambda_schedule()
    assert sched(0, 100) == 0.3 and sched(49, 100) == 0.3 and sched(50, 100) == 0.1
    sched = TrainConfig(mtp_lambda="0.5->0.2@10->0.05@0.9").lambda_schedule()
    assert [sched(s, 100) for s in (0, 10, 89, 90)] == [0.5, 0.2, 0.2, 0.05]


def test_heads_only_training_leaves_the_trunk_byte_for_byte(corpus, tmp_path):
    from safetensors.torch import load_file

    first = multitoken.train(**fast(corpus, tmp_path / "a", family="bpd", max_steps=2))
    trunk_dir = first.checkpoint / "trunk"
    result = multitoken.train(
        **fast(
            corpus,
            tmp_path / "b",
            family="deepseek",
            depth=2,
            max_steps=6,
            trunk=str(trunk_dir),
            freeze_trunk=True,
        )
    )
    before = load_file(str(trunk_dir / "model.safetensors"))
    after = result.model.trunk.state_dict()  # the trunk as it stands after training
    assert not (result.checkpoint / "trunk").exists()  # a frozen --trunk is referred to
    for name in before:  # bit-identical, not merely close
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name
    again = load_checkpoint(result.checkpoint)[0].trunk.state_dict()
    assert all(torch.equal(before[n], again[n]) for n in before)
    # A heads-only run resumes from its checkpoint, finding the trunk where it refers to it.
    options = fast(corpus, tmp_path / "b", family="deepseek", depth=2, max_steps=8)
    resumed = multitoken.train(**options, trunk=str(trunk_dir), freeze_trunk=True, resume=True)
    assert resumed.step == 8 and not (resumed.checkpoint / "trunk").exists()
    val = [m for m in read_metrics(tmp_path / "b") if m["split"] == "val"]
    assert val[-1]["head_losses"][0] < val[0]["head_losses"][0]  # the heads did learn
    assert val[-1]["main_loss"] == pytest.approx(val[0]["main_loss"], abs=1e-6)


def test_training_time_test_trains_the_module_reused_past_d(corpus, tmp_path):
    """--ttt-steps 2 on one DeepSeek module: training teaches and reports three drafts along
    the chain (the module reused for drafts 2 and 3, fed its own states: what it computes is
    pinned against drafting in tests/heads/test_drafting.py), every one of their losses falls,
    and decoding drafts that far by default, exactly."""
    from multitoken.decode.api import generate, make_plan

    options = fast(corpus, tmp_path / "ttt", family="deepseek", depth=1, ttt_steps=2)
    multitoken.train(**options)
    val = [m for m in read_metrics(tmp_path / "ttt") if m["split"] == "val"]
    assert len(val[-1]["head_losses"]) == 3 and len(val[-1]["accept"]) == 3
    for before, after in zip(val[0]["head_losses"], val[-1]["head_losses"]):
        assert after < before - 0.5
    loaded = multitoken.load(tmp_path / "ttt")
    assert loaded.head_config.ttt_steps == 2
    prompts = [list(b"def split(s):\n    "), list(b"import ")]
    assert make_plan(loaded, prompts).k_max == 3
    spec = generate(loaded, prompts, max_new_tokens=24, tree="chain")
    ref = generate(loaded, prompts, max_new_tokens=24, speculate=False)
    assert spec.tokens == ref.tokens and len(spec.stats.acceptance) == 3
