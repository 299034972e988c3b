"""Builders shared by the test files: tiny corpora, model folders, checkpoints and training runs.

Everything here is deliberately small (litgpt-style micro configs, a few steps of training) so a
test that needs a real run, folder or checkpoint pays seconds, not minutes. ``micro_llama`` and
the distribution helpers stay in ``conftest.py``, which every test module can import.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from conftest import micro_llama, perturb_heads

import multitoken
from multitoken.checkpoint import save_checkpoint
from multitoken.config import HeadConfig
from multitoken.model import MTPModel
from multitoken.tokenizer import ByteTokenizer
from multitoken.tokenizer_export import write_hf_tokenizer
from multitoken.trainer import TrainResult
from multitoken.trunk import quiet_transformers

BYTES = ByteTokenizer.vocab_size  # 259: a micro trunk over the byte tokenizer
CODE_WORDS = ("def", "return", "x", "y", "=", "+", "(", ")", ":")


def write_corpus(folder: Path, texts: list[str], suffix: str = ".txt") -> Path:
    """``folder`` holding one file per text (``f0.txt``, ``f1.txt``, ...); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"f{i}{suffix}").write_text(text)
    return folder


def tiny_corpus(folder: Path, files: int = 5, words: int = 90, seed: int = 0) -> Path:
    """``files`` small Python-like files of ``words`` random code words each (seeded)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(CODE_WORDS) for _ in range(words)) + "\n" for _ in range(files)]
    return write_corpus(folder, texts, suffix=".py")


def trunk_folder(folder: Path, seed: int = 0, vocab: int = BYTES) -> Path:
    """A plain transformers model folder: a random micro Llama with the byte tokenizer's files,
    usable as ``--trunk`` (or ``--checkpoint`` for decoding)."""
    with quiet_transformers():
        micro_llama(seed, vocab=vocab).save_pretrained(folder)
    write_hf_tokenizer(ByteTokenizer(), folder)
    return folder


def saved_run(
    run_dir: Path,
    family: str = "deepseek",
    depth: int = 2,
    trunk_seed: int = 3,
    head_seed: int = 7,
    step: int = 1,
) -> MTPModel:
    """A run folder with one checkpoint at ``step``: a byte-level micro trunk and heads moved off
    their initial values (so a load that dropped them would be seen). Returns the saved model."""
    trunk = micro_llama(trunk_seed, vocab=BYTES)
    model = perturb_heads(MTPModel(trunk, HeadConfig(family=family, depth=depth)), seed=head_seed)
    save_checkpoint(run_dir, step, model, ByteTokenizer(), {})
    return model


def train_tiny(
    out: Path, data: Path, family: str = "bpd", depth: int = 1, **options: Any
) -> TrainResult:
    """``multitoken.train`` on ``data`` into ``out`` with the smallest settings that still save a
    checkpoint: two steps of two rows of 16 tokens on the CPU in fp32. ``options`` override any
    of them or add others (``trunk``, ``freeze_trunk``, ...). The run folder is ``result.out``."""
    values: dict[str, Any] = dict(
        data=[str(data)],
        out=str(out),
        family=family,
        depth=depth,
        seq_len=16,
        batch_size=2,
        max_steps=2,
        eval_batches=1,
        precision="fp32",
        device="cpu",
    )
    values.update(options)
    return multitoken.train(**values)


def one_line_error(capsys: pytest.CaptureFixture[str], flag: str | None = None) -> str:
    """The CLI's error output, checked to be one line ``multitoken: error: FLAG: ...`` (any flag
    when ``flag`` is None); returns that line."""
    err = capsys.readouterr().err.strip().splitlines()
    prefix = "multitoken: error: " + (f"{flag}: " if flag else "--")
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]
