"""Prompts for decoding, benchmarking and distillation: from a file, or windows of a corpus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from multitoken.errors import MultitokenError

MAX_PROMPT_SOURCE_CHARS = 4 << 20  # corpus text read to pick prompts from


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-blank line, or per ``"text"`` field of a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise MultitokenError(f"no such file: {path}", "--prompts")
    texts = []
    for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MultitokenError(f'{path}:{number}: not JSON with a "text"', "--prompts")
            line = record["text"]
        texts.append(line)
    if not texts:
        raise MultitokenError(f"{path} holds no prompt", "--prompts")
    return texts


def window_prompts(texts: Iterable[str], tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` distinct windows of ``length`` tokens, each starting at a line, spread evenly.

    Held-out text keeps the measurement honest: the trunk has not memorised it. Windows of mostly
    whitespace are skipped because their continuation is trivial to draft.
    """
    pieces, read = [], 0
    for text in texts:
        pieces.append(text)
        read += len(text)
        if read >= MAX_PROMPT_SOURCE_CHARS:
            break
    starts = [(i, m.start()) for i, t in enumerate(pieces) for m in re.finditer(r"^.*\S", t, re.M)]
    prompts: list[list[int]] = []
    tried: set[int] = set()
    for j in range(count):
        first = j * len(starts) // count
        for k in range(first, first + min(len(starts), 1000)):
            k %= len(starts)
            if k in tried:
                continue
            tried.add(k)
            piece, at = starts[k]
            ids = tokenizer.encode(pieces[piece][at : at + 16 * length])[:length]
            text = tokenizer.decode(ids)
            mostly_space = sum(c.isspace() for c in text) > len(text) / 2
            if len(ids) == length and not mostly_space and ids not in prompts:
                prompts.append(ids)
                break
    return prompts
