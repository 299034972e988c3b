"""Self-distillation data: the trunk's own continuations of prompts, to train heads on.

Heads are accepted when they predict what the trunk itself will write, so labels the trunk agrees
with raise acceptance (Medusa §2.3.2). ``multitoken distill`` decodes prompts in batches (with the
checkpoint's heads when it has them — decoding is lossless, so only the speed changes) and appends
one JSON line per prompt: ``{"text": prompt + continuation, "prompt": ..., "completion": ...}``.
The file is resumable: prompts already written are skipped, and each line is written whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from multitoken.config import GenerateConfig
from multitoken.data import FULL_SPAN, Corpus, iter_texts
from multitoken.generate import generate
from multitoken.model import MTPModel
from multitoken.prompts import window_prompts


def corpus_prompts(
    corpus: Corpus, tokenizer, count: int, prompt_tokens: int, split: str = "train"
) -> list[str]:
    """``count`` windows of ``prompt_tokens`` tokens from a split of the corpus, each starting at
    a line, spread evenly (see :func:`multitoken.prompts.window_prompts`)."""
    files = corpus.train_files if split == "train" else corpus.val_files
    span = corpus.stream_kwargs(split).get("span", FULL_SPAN)
    ids = window_prompts(iter_texts(files, span), tokenizer, count, prompt_tokens)
    return [tokenizer.decode(x) for x in ids]


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def distill(
    model: MTPModel, prompts: list[str], out: Path, config: GenerateConfig, batch_size: int = 8
) -> int:
    """Append the trunk's continuations of ``prompts`` to ``out`` (JSONL); returns lines written.
    Prompts whose line is already in ``out`` (a previous, interrupted run) are skipped."""
    done = 0
    if out.exists():
        with out.open("rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):  # a line cut by a crash: drop it
            data = data[: data.rfind(b"\n") + 1]
            out.write_bytes(data)
        done = data.count(b"\n")
    todo = prompts[done:]
    tok = model.tokenizer
    written = 0
    with (
        out.open("a", encoding="utf-8") as f,
        tqdm(total=len(prompts), initial=done, unit="prompt", desc="distill") as bar,
    ):
        for batch in _batches(todo, batch_size):
            result = generate(model, [tok.encode(p) for p in batch], config, eos_id=tok.eos_id)
            for prompt, ids in zip(batch, result.tokens):
                completion = tok.decode([t for t in ids if t != tok.eos_id])
                record = {"text": prompt + completion, "prompt": prompt, "completion": completion}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            bar.update(len(batch))
    return written
