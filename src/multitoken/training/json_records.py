"""The records of a JSON array or a JSON Lines file, read one at a time: :class:`RecordReader`.

Its own module because streaming a file too large to load whole, and stopping cleanly at the
last whole record of a truncated one, is a job apart from what the records mean: the reader
knows JSON, :mod:`multitoken.training.conversations` knows chats (and names everything here
too).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from multitoken.errors import MultitokenError

CHUNK_BYTES = 1 << 20
MAX_RECORD_CHARS = 64 << 20  # a "record" this long without a close is a broken file, not data
SNIFF_RECORD_CHARS = 4 << 20


class RecordReader:
    """The top-level records of a JSON array (``[{...}, ...]``) or a JSON Lines file, in order.

    Reads ``CHUNK_BYTES`` at a time and decodes one record at a time with
    :meth:`json.JSONDecoder.raw_decode`, so memory holds a chunk plus one record. A truncated or
    malformed file ends the iteration at its last whole record instead of raising: afterwards
    ``problem`` says what was wrong (None for a clean file) and ``stopped_at`` is the byte offset
    where reading stopped. ``on_bytes(n)`` is told of every chunk read (a progress bar).
    """

    def __init__(
        self,
        path: Path,
        max_record_chars: int = MAX_RECORD_CHARS,
        on_bytes: Callable[[int], object] | None = None,
    ) -> None:
        self.path, self.max_record_chars, self.on_bytes = path, max_record_chars, on_bytes
        self.records, self.stopped_at, self.problem = 0, 0, None

    def __iter__(self) -> Iterator[object]:
        decoder = json.JSONDecoder()
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._buf, self._pos, self._eof, self._closed = "", 0, False, False
        self.records, self.stopped_at, self.problem = 0, 0, None
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise MultitokenError(f"cannot read {self.path}: {exc.strerror}", "--data") from exc
        with self._file:
            self._skip_space()
            array = self._buf[self._pos : self._pos + 1] == "["
            if array:
                self._advance(1)
            while True:
                self._skip_space(",]" if array else "")
                if self._pos >= len(self._buf):
                    if array and not self._closed:
                        self.problem = "the JSON array is not closed (a truncated file?)"
                    return
                if self._closed:
                    self.problem = "unexpected data after the JSON array"
                    return
                value = self._value(decoder) if array else self._line()
                if value is _STOP:
                    return
                self.records += 1
                yield value

    def _fill(self) -> bool:
        """Read a chunk into the buffer (dropping what was consumed); False at the end."""
        if self._eof:
            return False
        chunk = self._file.read(CHUNK_BYTES)
        self._eof = not chunk
        if self.on_bytes and chunk:
            self.on_bytes(len(chunk))
        self._buf = self._buf[self._pos :] + self._decode(chunk, final=self._eof)
        self._pos = 0
        return bool(chunk)

    def _advance(self, chars: int) -> None:
        """Consume ``chars`` characters, counting their UTF-8 bytes into ``stopped_at``."""
        self.stopped_at += len(self._buf[self._pos : self._pos + chars].encode("utf-8"))
        self._pos += chars

    def _skip_space(self, separators: str = "") -> None:
        """Skip whitespace and ``separators`` (an array's commas; its ``]`` closes it)."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\r\n" + separators:
                if self._buf[self._pos] == "]":
                    if self._closed:
                        return  # a second "]": the caller reports the trailing data
                    self._closed = True
                self._advance(1)
            if self._pos < len(self._buf) or not self._fill():
                return

    def _value(self, decoder: json.JSONDecoder) -> object:
        """The next array element. A value that reaches the end of the buffer may go on in the
        next chunk (a number, or a record cut by the chunk), so it is decoded again with more."""
        while True:
            try:
                value, end = decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if len(self._buf) - self._pos > self.max_record_chars or not self._fill():
                    self.problem = f"a record is truncated or malformed ({exc.msg})"
                    return _STOP
                continue
            if end < len(self._buf) or not self._fill():
                self._advance(end - self._pos)
                return value

    def _line(self) -> object:
        """The next JSON Lines record: one line, which must parse on its own."""
        while (newline := self._buf.find("\n", self._pos)) < 0 and not self._eof:
            if len(self._buf) - self._pos > self.max_record_chars:
                break
            self._fill()
        end = newline + 1 if newline >= 0 else len(self._buf)
        try:
            value = json.loads(self._buf[self._pos : end])
        except json.JSONDecodeError as exc:
            self.problem = f"a line is truncated or malformed ({exc.msg})"
            return _STOP
        self._advance(end - self._pos)
        return value


_STOP = object()  # from RecordReader's _value and _line: no whole record here, stop


def first_record(path: Path) -> object:
    """The first record of a JSON array or JSON Lines file, or None if it has no whole one."""
    return next(iter(RecordReader(path, SNIFF_RECORD_CHARS)), None)
