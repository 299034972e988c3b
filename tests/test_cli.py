"""The command line: flags from the config dataclasses, config files, and bad input that gets a
one-line error naming the flag, exit status 2, no traceback, and nothing written to --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import micro_llama

from multitoken.cli import build_parser, error_line, main
from multitoken.config import HeadConfig, TrainConfig
from multitoken.decode.trees.spec import DEFAULT_LOOKUP
from multitoken.errors import MultitokenError


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multitoken", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (root / "b.txt").write_text("pack my box with five dozen liquor jugs\n" * 200)
    return root


def test_cli_defaults_are_the_dataclass_defaults():
    args = build_parser().parse_args(["train"])
    assert not any(k in vars(args) for k in ("depth", "family", "max_steps"))  # SUPPRESS
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert f"(default: {TrainConfig().max_steps})" in help_text
    assert f"(default: {HeadConfig().family})" in help_text


def test_train_from_a_config_file_with_flag_override(tmp_path, small_text):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'family = "bpd"\ndepth = 3\nmax_steps = 2\nseq_len = 32\nbatch_size = 2\n'
        f'data = ["{small_text}"]\neval_batches = 1\nout = "{tmp_path / "x"}"\n'
    )
    assert main(["train", "--config", str(cfg), "--depth", "2"]) == 0
    saved = json.loads((tmp_path / "x" / "train_config.json").read_text())
    assert saved["heads"]["family"] == "bpd" and saved["heads"]["depth"] == 2
    assert saved["max_steps"] == 2


def _bad_input_cases(tmp_path: Path, small_text: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    micro = tmp_path / "micro"
    micro_llama().save_pretrained(micro)  # vocabulary 64 < the byte tokenizer's 259
    common = ["--data", str(small_text), "--max-steps", "1", "--seq-len", "16"]
    return {
        "unknown family": (["--family", "medusa", *common], "--family"),
        "depth < 1": (["--depth", "0", *common], "--depth"),
        "branch layer out of range": (
            ["--family", "meta", "--branch-layer", "4", *common],
            "--branch-layer",
        ),
        "branch layer on another family": (["--branch-layer", "1", *common], "--branch-layer"),
        "missing corpus": (["--data", str(tmp_path / "nope"), "--max-steps", "1"], "--data"),
        "empty corpus": (["--data", str(empty), "--max-steps", "1"], "--data"),
        "tokenizer too big for the trunk": (
            ["--trunk", str(micro), "--tokenizer", "bytes", *common],
            "--tokenizer",
        ),
        "trunk folder without a tokenizer": (["--trunk", str(micro), *common], "--tokenizer"),
        "trunk that is not a model": (["--trunk", str(small_text), *common], "--trunk"),
        "missing tokenizer": (["--tokenizer", str(tmp_path / "tok.json"), *common], "--tokenizer"),
        "bad lambda": (["--mtp-lambda", "0.3->x", *common], "--mtp-lambda"),
        "resume without a run": (["--resume", *common], "--resume"),
    }


CASES = [
    "unknown family",
    "depth < 1",
    "branch layer out of range",
    "branch layer on another family",
    "missing corpus",
    "empty corpus",
    "tokenizer too big for the trunk",
    "trunk folder without a tokenizer",
    "trunk that is not a model",
    "missing tokenizer",
    "bad lambda",
    "resume without a run",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, small_text, case):
    args, flag = _bad_input_cases(tmp_path, small_text)[case]
    out = tmp_path / "out"
    proc = run_cli("train", *args, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


TINY = [
    "--max-steps",
    "2",
    "--save-every",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--eval-batches",
    "1",
]


def _train_tiny(out: Path, data: Path, *extra: str) -> None:
    args = ["train", "--data", str(data), *TINY, "--out", str(out), *extra]
    assert main(args) == 0


@pytest.mark.parametrize("damage", ["heads", "trunk", "meta"])
def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path, small_text, damage):
    out = tmp_path / "run"
    _train_tiny(out, small_text)
    ckpt = out / "checkpoints" / "step-0000002"
    target = {
        "heads": ckpt / "heads.safetensors",
        "trunk": ckpt / "trunk" / "model.safetensors",
        "meta": ckpt / "multitoken.json",
    }[damage]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in out.rglob("*"))
    resume = ["--resume", "--data", str(small_text), *TINY, "--max-steps", "4", "--out", str(out)]
    proc = run_cli("train", *resume)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in proc.stderr
    assert "corrupt" in lines[0] or "damaged" in lines[0] or "truncated" in lines[0]
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing new, nothing removed


def test_existing_run_is_not_overwritten(tmp_path, small_text):
    out = tmp_path / "run"
    _train_tiny(out, small_text)
    proc = run_cli("train", "--data", str(small_text), "--max-steps", "1", "--out", str(out))
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_tokenizer_train_command(tmp_path, small_text):
    out = tmp_path / "tok.json"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(small_text),
                "--vocab-size",
                "300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from multitoken.text.tokenizer import load_tokenizer

    tok = load_tokenizer(str(out))
    assert tok.vocab_size <= 300
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, small_text):
    out = tmp_path / "run"
    # Adam moves every weight by about lr on its first step: lr 1e30 overflows the next forward.
    proc = run_cli(
        "train",
        "--data",
        str(small_text),
        "--max-steps",
        "5",
        "--save-every",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--eval-every",
        "100",
        "--precision",
        "fp32",
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--out",
        str(out),
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in last and "Traceback" not in proc.stderr
    latest = (out / "latest").read_text().strip()
    assert latest in last  # the message names the checkpoint that was kept
    assert (out / latest / "heads.safetensors").is_file()
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    assert int(latest.split("-")[-1]) == stopped_at - 1  # nothing saved from the bad step
    losses = [
        json.loads(x)["loss"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in x
    ]
    assert all(abs(v) < float("inf") for v in losses)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_text) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    _train_tiny(out, small_text, "--family", "bpd", "--depth", "2")
    return out


def test_generate_prints_text_and_json_statistics(checkpoint):
    proc = run_cli(
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["prompt"] == "the quick" and result["stats"]["tokens"] == 12
    # the default: trees of the D = 2 heads' drafts and prompt lookup's, as deep as its 8
    assert 1 <= result["stats"]["tau"] <= 1 + DEFAULT_LOOKUP
    assert len(result["stats"]["acceptance"]) == DEFAULT_LOOKUP
    plain = run_cli(
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "12",
        "--json",
        "--no-speculate",
    )
    assert json.loads(plain.stdout)["text"] == result["text"]  # lossless greedy


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--prompt", ""], "--prompt"),
        (["--prompt", "x", "--draft-len", "0"], "--draft-len"),
        (["--prompt", "x", "--draft-len", "3"], "--draft-len"),  # bpd with D = 2 cannot draft 3
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x" * 3000], "--prompt"),  # longer than the context window
        (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
        (["--prompt", "x", "--tree", "dynamic:x"], "--tree"),
        (["--prompt", "x", "--tree", "2,2,2"], "--tree"),  # deeper than D = 2
    ],
)
def test_generate_bad_input(checkpoint, args, flag):
    proc = run_cli("generate", "--checkpoint", str(checkpoint), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # not even the prompt: nothing half-written


def test_errors_read_plainly_from_python_and_name_their_flag_on_the_command_line(tmp_path, capsys):
    exc = MultitokenError("no prompts", "--prompt")
    assert str(exc) == exc.message == "no prompts" and exc.flag == "--prompt"
    assert error_line(exc) == "--prompt: no prompts"
    assert error_line(MultitokenError("no flag")) == "no flag"
    missing = tmp_path / "nope"
    assert main(["generate", "--checkpoint", str(missing), "--prompt", "x"]) == 2
    assert (
        capsys.readouterr().err
        == f"multitoken: error: --checkpoint: no such checkpoint: {missing}\n"
    )


def test_generate_missing_checkpoint(tmp_path):
    proc = run_cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr


def test_checkpoint_without_heads_falls_back_to_the_trunk_with_one_warning(checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "noheads"
    shutil.copytree(checkpoint / "checkpoints" / "step-0000002", copy)
    (copy / "heads.safetensors").unlink()
    (copy / "heads.json").unlink()
    proc = run_cli(
        "generate", "--checkpoint", str(copy), "--prompt", "the", "--json", "--max-new-tokens", "5"
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "no MTP heads" in warnings[0]
    assert json.loads(proc.stdout)["stats"]["tokens"] == 5


def test_distill_writes_the_trunks_own_continuations_and_resumes(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\npack my box\nthe lazy\n")
    out = tmp_path / "d.jsonl"
    args = [
        "distill",
        "--checkpoint",
        str(checkpoint),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--precision",
        "fp32",  # as multitoken.load below decodes
        "--out",
        str(out),
    ]
    assert main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["the quick", "pack my box", "the lazy"]
    import multitoken

    model = multitoken.load(checkpoint)
    texts, _ = model.generate("pack my box", max_new_tokens=6, speculate=False)
    assert lines[1]["completion"] == texts[0] and lines[1]["text"] == "pack my box" + texts[0]
    # an interrupted run leaves a cut line: it is dropped and redone, nothing is duplicated
    data = out.read_bytes()
    out.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 5])
    assert main(args) == 0
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again == lines


def test_every_subcommand_in_the_dispatch_table_has_a_parser_and_a_runner():
    from multitoken.cli import COMMANDS
    from multitoken.cli.flags import Parser

    listed = build_parser()._subparsers._group_actions[0].choices
    assert list(listed) == list(COMMANDS)
    assert set(COMMANDS) == {
        "train",
        "generate",
        "serve",
        "distill",
        "bench",
        "export",
        "tokenizer",
    }
    for name, module in COMMANDS.items():
        subparsers = Parser().add_subparsers(dest="command")
        module.add_parser(subparsers)
        assert list(subparsers.choices) == [name], module.__name__  # adds itself, nothing else
        assert callable(module.run), module.__name__


def test_main_runs_the_module_the_table_names(monkeypatch):
    from multitoken.cli import COMMANDS

    seen = []

    def fake_run(args) -> int:
        seen.append((args.command, args.format, args.out))
        return 7

    monkeypatch.setattr(COMMANDS["export"], "run", fake_run)
    assert main(["export", "--checkpoint", "c", "--out", "o", "--heads-only"]) == 7
    assert seen == [("export", "heads", "o")]


def _modules_after_import(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module`` and nothing else."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return set(proc.stdout.split())


def test_the_command_line_loads_torch_only_when_a_command_runs():
    loaded = _modules_after_import("multitoken.cli")
    assert "multitoken.cli.bench" in loaded  # the whole dispatch table was imported
    assert (
        not {"torch", "transformers", "multitoken.training.trainer"} & loaded
    )  # --help stays quick


def test_bench_is_a_library_without_training_or_command_line_code():
    loaded = _modules_after_import("multitoken.bench.run")
    assert "multitoken.decode.api" in loaded  # it did import what it measures
    training = {
        "multitoken.training.trainer",
        "multitoken.training.featcache",
        "multitoken.training.packing",
    }
    assert not (training | {"multitoken.cli", "multitoken.training.data"}) & loaded
    assert not any(name.startswith("multitoken.cli.") for name in loaded)
