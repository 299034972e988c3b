"""Export: a trunk-only folder that plain transformers loads, portable heads that load back onto
it, and bad destinations refused with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import micro_llama
from helpers import BYTES, one_line_error, saved_run, trunk_folder

import multitoken
from multitoken.cli import main
from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.io.checkpoint import save_checkpoint
from multitoken.model import MTPModel
from multitoken.text.tokenizer import ByteTokenizer


@pytest.fixture
def run(tmp_path):
    """A saved run with deepseek heads whose weights are not at their initial values."""
    return tmp_path / "run", saved_run(tmp_path / "run", family="deepseek", depth=2)


def test_trunk_only_export_loads_in_plain_transformers(run, tmp_path):
    run_dir, model = run
    assert (
        main(
            ["export", "--checkpoint", str(run_dir), "--trunk-only", "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    # A fresh interpreter in which importing multitoken fails: only transformers reads the folder.
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["multitoken"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "hf")!r})
        ids = tok("déf f(x): ✓", add_special_tokens=False)["input_ids"]
        out = model.generate(
            __import__("torch").tensor([ids]), max_new_tokens=8, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        print(json.dumps({{"ids": ids, "out": out[0].tolist(), "eos": tok.eos_token_id}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = ByteTokenizer().encode("déf f(x): ✓")
    assert got["ids"] == ids and got["eos"] == ByteTokenizer.eos_id
    ours = generate(model, [ids], max_new_tokens=8, speculate=False).tokens[0]
    assert got["out"] == ids + ours


def test_heads_only_export_loads_back_onto_the_exported_trunk(run, tmp_path):
    run_dir, model = run
    for flag, name in (("--trunk-only", "trunk"), ("--heads-only", "heads")):
        assert (
            main(["export", "--checkpoint", str(run_dir), flag, "--out", str(tmp_path / name)]) == 0
        )
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == [
        "heads.json",
        "heads.safetensors",
    ]
    loaded = multitoken.load(tmp_path / "trunk", heads=tmp_path / "heads")
    prompt = [ByteTokenizer().encode("for i in range(")]
    ours, theirs = (  # a fixed tree: the automatic modes also follow the steps timed
        generate(model, prompt, max_new_tokens=16, tree="dynamic:6"),
        generate(loaded, prompt, max_new_tokens=16, tree="dynamic:6"),
    )
    assert ours.tokens == theirs.tokens and ours.stats.acceptance == theirs.stats.acceptance
    # ... and from the command line, the heads folder goes with --heads.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "multitoken",
            "generate",
            "--checkpoint",
            str(tmp_path / "trunk"),
            "--heads",
            str(tmp_path / "heads"),
            "--prompt",
            "for i in range(",
            "--max-new-tokens",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == ByteTokenizer().decode(ours.tokens[0])


@pytest.mark.parametrize("case", ["existing folder", "v3 layout of bpd heads", "no heads"])
def test_bad_export_is_one_line_exit_2_and_nothing_written(run, tmp_path, capsys, case):
    run_dir, _ = run
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(run_dir), "--heads-only", "--out", str(out)]
    if case == "existing folder":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "v3 layout of bpd heads":
        bpd = MTPModel(micro_llama(0, vocab=BYTES), HeadConfig(family="bpd", depth=1))
        save_checkpoint(tmp_path / "bpd", 1, bpd, ByteTokenizer(), {})
        args = ["export", "--checkpoint", str(tmp_path / "bpd"), "--deepseek-v3", "--out", str(out)]
    else:
        args[2] = str(trunk_folder(tmp_path / "plain"))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left behind
    if case == "existing folder":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
