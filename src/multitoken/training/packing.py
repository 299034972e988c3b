"""Packing: documents as one token stream cut into training rows, resumable to the exact batch.

Files are read through :mod:`multitoken.training.data` in blocks of about 1 MiB, so memory stays bounded
by one block plus one batch however large the corpus is.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from multitoken.errors import MultitokenError
from multitoken.text.tokenizer import AddedSpecials, Tokenizer
from multitoken.training.data import BLOCK_BYTES, FULL_SPAN, Corpus, Piece, read_block, span_bounds

_POSITION = ("epoch", "file_index", "offset", "epoch_tokens")


class PackedStream:
    """Documents as one token stream (each followed by eos), cut into batches of rows.

    Each document is encoded as the tokenizer encodes a whole text, so it starts as a prompt
    will (with a BOS, for tokenizers that add one) and the trunk trains on what it decodes
    from; a rendered chat spells its own special tokens and gets none added (see
    :func:`document_ids`).

    A row holds ``seq_len + 1`` tokens and the next row starts on the previous row's last token,
    so every token is a prediction target exactly once. Each epoch shuffles the file order with
    ``random.Random(seed + epoch)``; rank ``r`` of ``world_size`` takes every ``world_size``-th
    file of that order, so ranks see disjoint files. Tokens left over at the end of an epoch
    carry into the next. With ``loop=False`` one pass is made and the last partial batch dropped.

    With ``per_file`` no row spans two files: each file is cut on its own from its first token,
    and its last tokens short of a row are dropped (a file shorter than a row gives none). Every
    epoch then cuts exactly the same rows, in another file order: heads-only training uses it so
    that a frozen trunk's states can be cached by row across epochs (:mod:`multitoken.training.featcache`).

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
        per_file: bool = False,
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
        self.per_file = per_file
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
        # Rows cut so far this epoch (per_file: an epoch with none would loop forever); None when
        # restored mid-epoch, where the rows cut before are not known.
        self._epoch_rows = 0 if block_at[1:3] == (0, 0) and skip == 0 else None

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
            if self.per_file and self._block_at[2] == 0:  # a new file: drop the last one's tail
                self._buf, self._pos = [], 0
            self._buf = self._buf[self._pos :] + ids
            self._carry_len = len(self._buf) - len(ids)
            self._pos = 0
        row = self._buf[self._pos : self._pos + row_len]
        self._pos += self.seq_len
        if self._epoch_rows is not None:
            self._epoch_rows += 1
        return row

    def _read_next_block(self) -> list[int] | None:
        """Tokens of the block at the cursor, moving the cursor on; None when a pass is over."""
        if self._file_index >= len(self._order) and not self._next_epoch():
            return None
        path = self._order[self._file_index]
        start, stop = span_bounds(path, self.span)
        self._block_at = (self._epoch, self._file_index, self._offset, self._epoch_tokens)
        pieces, end = [], stop
        if start + self._offset < stop:
            pieces, end = read_block(
                path, start + self._offset, stop, self.block_bytes, self.tokenizer
            )
        ids = [token for piece in pieces for token in document_ids(piece, self.tokenizer)]
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
        if self.per_file and self._epoch_rows == 0:
            raise MultitokenError(
                f"none of the {len(self._order)} file(s) gives a row of {self.seq_len + 1} "
                "tokens, and heads-only training cuts rows within files: lower --seq-len or "
                "join the files",
                "--seq-len",
            )
        self._epoch, self._file_index, self._offset, self._epoch_tokens = self._epoch + 1, 0, 0, 0
        self._epoch_rows = 0
        self._order = self._epoch_order(self._epoch)
        return True


def document_ids(piece: Piece, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a piece of a document: the tokenizer's prefix before a document's first
    piece, its suffix after the last, then eos to separate documents (once: not after a suffix
    that already ends with eos)."""
    specials = tokenizer.added_specials if piece.add_special_tokens else AddedSpecials()
    ids = tokenizer.encode(piece.text)
    if piece.starts:
        ids[:0] = specials.prefix
    if piece.ends:
        ids.extend(specials.suffix)
        if specials.suffix[-1:] != (tokenizer.eos_id,):
            ids.append(tokenizer.eos_id)
    return ids


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
