"""Training text: find the files, split them, and stream them as packed token rows.

The default corpus is the running interpreter's standard library source, so training works
offline with nothing to download. User data is any mix of files, folders and glob patterns;
``.jsonl`` files hold one document per line (``{"text": ...}``, or a chat as ``{"messages":
[...]}`` rendered with the tokenizer's chat template), every other file is one document.

:class:`PackedStream` reads files in blocks of about 1 MiB, so memory stays bounded by one block
plus one batch however large the corpus is. Its state is a read position plus a few carried
tokens; on resume it re-reads and re-encodes the current block, which keeps checkpoints small and
makes a resumed run see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from multitoken.errors import MultitokenError
from multitoken.tokenizer import ChatTemplateError, Tokenizer

BLOCK_BYTES = 1 << 20
SNIFF_BYTES = 8192  # a NUL byte in this much of a file marks it as binary
FULL_SPAN = (0.0, 1.0)
STDLIB_SPEC = "stdlib"  # names the default corpus explicitly, e.g. `multitoken bench --data stdlib`
# Where a stream's current block was read, as saved in its state.
_POSITION = ("epoch", "file_index", "offset", "epoch_tokens")
_SKIPPED_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}

# A piece of a document as read from disk, and whether the document ends with it.
Piece = tuple[str, bool]


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
    """Train and validation files. Building one reads no file contents beyond binary sniffing.

    When the corpus is a single file, ``train_files`` and ``val_files`` are that same file, cut
    by bytes: the first ``1 - val_fraction`` trains, the rest validates. Streams learn their part
    from :meth:`stream_kwargs`: ``PackedStream(c.train_files, ..., **c.stream_kwargs("train"))``.
    """

    train_files: list[Path]
    val_files: list[Path]
    val_fraction: float = 0.05

    @classmethod
    def from_specs(cls, specs: Sequence[str] | None, val_fraction: float = 0.05) -> Corpus:
        """Resolve ``specs`` (None, empty or ``["stdlib"]``: the standard library) and split."""
        if specs and list(specs) != [STDLIB_SPEC]:
            files = resolve_sources(specs)
            root = Path(os.path.commonpath([path.parent for path in files]))
        else:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = [path for path in stdlib_files() if path.stat().st_size > 0]
        train, val = split_files(files, val_fraction, root)
        return cls(train, val, val_fraction)

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
      exists) the messages' text contents, one per line.

    Raises :class:`~multitoken.tokenizer.ChatTemplateError` when the tokenizer has no template
    or the template refuses the messages, and ``ValueError`` for a malformed ``messages``.
    """
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if "messages" not in record:
        return None
    messages = chat_messages(record["messages"])
    if tokenizer is None:
        return "\n".join(_content_text(m.get("content")) for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def chat_messages(value: object) -> list[dict]:
    """``value`` checked to be a chat: a non-empty list of objects with a string ``role``.

    Contents are left to the template (a string, or a list of parts for some models)."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    ):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    return value


def _content_text(content: object) -> str:
    """Text of a message's content: a string, or the ``text`` of each part of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def iter_texts(
    files: Sequence[Path],
    span: tuple[float, float] = FULL_SPAN,
    tokenizer: Tokenizer | None = None,
) -> Iterator[str]:
    """The text of ``files`` in pieces of at most about 1 MiB, e.g. to fit a BPE tokenizer.

    Chat records are rendered with ``tokenizer``'s template when one is given (see
    :func:`document_text`)."""
    for path in files:
        start, stop = _span_bounds(path, span)
        while start < stop:
            pieces, start = _read_block(path, start, stop, BLOCK_BYTES, tokenizer)
            yield from (text for text, _ in pieces)


def _span_bounds(path: Path, span: tuple[float, float]) -> tuple[int, int]:
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


def _read_block(
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
    return [(data.decode("utf-8", errors="replace"), end >= stop)], end


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
                raise MultitokenError(f"{where}: {exc.reason}", exc.flag) from None
            except ValueError as exc:
                reason = f"is malformed: {exc}"
            else:
                if text is not None:
                    pieces.append((text, True))
                    continue
                reason = 'has neither a "text" string nor a "messages" list'
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


# ---------------------------------------------------------------------------------------------
# Packing and streaming


class PackedStream:
    """Documents as one token stream (each followed by eos), cut into batches of rows.

    A row holds ``seq_len + 1`` tokens and the next row starts on the previous row's last token,
    so every token is a prediction target exactly once. Each epoch shuffles the file order with
    ``random.Random(seed + epoch)``; rank ``r`` of ``world_size`` takes every ``world_size``-th
    file of that order, so ranks see disjoint files. Tokens left over at the end of an epoch
    carry into the next. With ``loop=False`` one pass is made and the last partial batch dropped.

    ``span`` selects a byte range of every file as fractions of its size (see :class:`Corpus`).
    JSONL chat records are rendered with ``tokenizer``'s chat template (see :func:`document_text`).
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        *,
        shuffle: bool = True,
        span: tuple[float, float] = FULL_SPAN,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        if seq_len < 1:
            raise MultitokenError(f"sequence length must be positive, got {seq_len}", "--seq-len")
        if batch_size < 1:
            raise MultitokenError(f"batch size must be positive, got {batch_size}", "--batch-size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if len(files) < world_size:
            raise MultitokenError(
                f"{len(files)} file(s) for {world_size} rank(s): each rank needs a file", "--data"
            )
        self.files = list(files)
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.loop, self.shuffle, self.span, self.block_bytes = loop, shuffle, span, block_bytes
        self._restore((0, 0, 0, 0), skip=0, carry=[])

    # The cursor (_epoch, _file_index, _offset) is where the next block starts, the offset being
    # relative to the file's span. _buf holds carried tokens, then the last block's tokens:
    # _buf[:_carry_len] came before that block, which was read at _block_at (with the epoch's
    # token count before it); _pos is where the next row starts. After a restore, _skip says how
    # many tokens of the re-read block were already used.

    def state_dict(self) -> dict:
        """JSON-able position: where the current block starts, how much of it is used, and the
        tokens carried from before it. Small, because a restored stream re-reads that block."""
        skip = self._skip + max(0, self._pos - self._carry_len)
        carry = self._buf[self._pos : self._carry_len]
        return {
            **self._identity(),
            **dict(zip(_POSITION, self._block_at)),
            "skip": skip,
            "carry": carry,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that produced ``state`` stood."""
        found = {key: state.get(key) for key in self._identity()}
        if found != self._identity():
            raise MultitokenError(
                f"data stream state is for {found}, not {self._identity()}", "--resume"
            )
        self._restore(tuple(state[key] for key in _POSITION), state["skip"], state["carry"])

    def _identity(self) -> dict:
        """What a saved state must match: other files or ranks would read other data."""
        return {"files": len(self.files), "rank": self.rank, "world_size": self.world_size}

    def _restore(self, block_at: tuple, skip: int, carry: list[int]) -> None:
        self._block_at = block_at
        self._epoch, self._file_index, self._offset, self._epoch_tokens = block_at
        self._order = self._epoch_order(self._epoch)
        self._buf = [int(token) for token in carry]
        self._carry_len, self._pos, self._skip = len(self._buf), 0, skip

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            row = self._next_row()
            if row is None:
                raise StopIteration
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def _epoch_order(self, epoch: int) -> list[Path]:
        order = list(range(len(self.files)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return [self.files[i] for i in order[self.rank :: self.world_size]]

    def _next_row(self) -> list[int] | None:
        row_len = self.seq_len + 1
        while len(self._buf) - self._pos < row_len:
            ids = self._read_next_block()
            if ids is None:
                return None
            if self._skip:
                ids, self._skip = ids[self._skip :], 0
            self._buf = self._buf[self._pos :] + ids
            self._carry_len = len(self._buf) - len(ids)
            self._pos = 0
        row = self._buf[self._pos : self._pos + row_len]
        self._pos += self.seq_len
        return row

    def _read_next_block(self) -> list[int] | None:
        """Tokens of the block at the cursor, moving the cursor on; None when a pass is over."""
        if self._file_index >= len(self._order) and not self._next_epoch():
            return None
        path = self._order[self._file_index]
        start, stop = _span_bounds(path, self.span)
        self._block_at = (self._epoch, self._file_index, self._offset, self._epoch_tokens)
        pieces, end = [], stop
        if start + self._offset < stop:
            pieces, end = _read_block(
                path, start + self._offset, stop, self.block_bytes, self.tokenizer
            )
        ids = []
        for text, ends_document in pieces:
            ids.extend(self.tokenizer.encode(text))
            if ends_document:
                ids.append(self.tokenizer.eos_id)
        self._epoch_tokens += len(ids)
        if end >= stop:
            self._file_index, self._offset = self._file_index + 1, 0
        else:
            self._offset = end - start
        return ids

    def _next_epoch(self) -> bool:
        """Start the next epoch; False if there is none. Refuses to spin on a tiny corpus."""
        if not self.loop:
            return False
        if self._epoch_tokens < self.seq_len + 1:
            raise MultitokenError(
                f"corpus too small for --seq-len {self.seq_len}: a pass over "
                f"{len(self._order)} file(s) gives {self._epoch_tokens} tokens, "
                f"fewer than one row of {self.seq_len + 1}",
                "--seq-len",
            )
        self._epoch, self._file_index, self._offset, self._epoch_tokens = self._epoch + 1, 0, 0, 0
        self._order = self._epoch_order(self._epoch)
        return True


def validation_batches(
    corpus: Corpus, tokenizer: Tokenizer, seq_len: int, batch_size: int, max_batches: int
) -> list[torch.Tensor]:
    """Up to ``max_batches`` fixed batches from the validation files, in file order.

    The same on every run and for every seed, so validation losses are comparable. A split too
    small for one full batch gives one smaller batch rather than nothing.
    """
    kwargs = corpus.stream_kwargs("val")
    stream = PackedStream(
        corpus.val_files, tokenizer, seq_len, 1, loop=False, shuffle=False, **kwargs
    )
    rows = list(itertools.islice(stream, max(0, max_batches) * batch_size))
    if not rows:
        if max_batches <= 0:
            return []
        raise MultitokenError(
            f"validation split is too small: {len(corpus.val_files)} file(s) give less than "
            f"one row of {seq_len + 1} tokens (add data or lower --seq-len)",
            "--data",
        )
    data = torch.cat(rows)
    if len(rows) < batch_size:
        return [data]
    full = len(rows) // batch_size * batch_size
    return list(data[:full].split(batch_size))
