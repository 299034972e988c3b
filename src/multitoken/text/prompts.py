"""Prompts for decoding, benchmarking and distillation: from a file, or windows of a corpus.

A prompts file holds one prompt per non-blank line, or, as ``.jsonl``, one ``{"text": ...}`` or
``{"messages": [...]}`` (a chat, to be rendered with the model's chat template) per line.

A prompt is encoded as the model's tokenizer encodes a whole text (with a BOS, for tokenizers
that add one); a rendered chat already spells its special tokens and gets none added
(:meth:`Prompt.encode`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.text.chat import ChatTemplateError, chat_messages
from multitoken.text.tokenizer import Tokenizer

MAX_PROMPT_SOURCE_CHARS = 4 << 20  # corpus text read to pick prompts from


@dataclass(frozen=True)
class Prompt:
    """One prompt as written in a file: plain ``text``, or a chat's ``messages``.

    ``where`` (``file:line``) names it in error messages. Chat prompts stay messages until
    :meth:`render` so a caller can keep them, e.g. to append the model's answer as a new turn.
    """

    text: str | None = None
    messages: list[dict] | None = None
    where: str = ""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def render(self, tokenizer: Tokenizer, flag: str = "--prompts") -> str:
        """The prompt text: a chat rendered with a generation prompt, ready for the answer."""
        if self.messages is None:
            return self.text or ""
        try:
            return tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise MultitokenError(f"{self.where}: {exc.message}", flag) from None

    def encode(self, tokenizer: Tokenizer, flag: str = "--prompts") -> list[int]:
        """Token ids of the prompt as the model expects them: the tokenizer's special tokens
        around plain text (as transformers' ``tokenizer(text)``), none added to a rendered chat
        (as ``apply_chat_template(tokenize=True)``)."""
        return tokenizer.encode(self.render(tokenizer, flag), add_special_tokens=not self.is_chat)


def read_prompt_records(path: str | Path) -> list[Prompt]:
    """The prompts of a file, chats kept as messages (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise MultitokenError(f"no such file: {path}", "--prompts")
    jsonl = path.suffix.lower() == ".jsonl"
    prompts = []
    for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        prompts.append(_jsonl_prompt(line, where) if jsonl else Prompt(text=line, where=where))
    if not prompts:
        raise MultitokenError(f"{path} holds no prompt", "--prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return Prompt(text=record["text"], where=where)
    if isinstance(record, dict) and "messages" in record:
        try:
            return Prompt(messages=chat_messages(record["messages"]), where=where)
        except ValueError as exc:
            raise MultitokenError(f"{where}: {exc}", "--prompts") from None
    raise MultitokenError(
        f'{where}: not JSON with a "text" string or a "messages" list', "--prompts"
    )


def window_prompts(
    texts: Iterable[str], tokenizer: Tokenizer, count: int, length: int
) -> list[list[int]]:
    """``count`` distinct windows of ``length`` tokens, each starting at a line, spread evenly.

    Windows are fragments of text: nothing is added around them. A caller that decodes from one
    as a prompt adds the tokenizer's special tokens (``tokenizer.added_specials.around``).

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
