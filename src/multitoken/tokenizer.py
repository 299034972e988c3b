"""Tokenizers behind one small interface: raw UTF-8 bytes, or any Hugging Face ``tokenizer.json``.

Training code only needs ids in, ids out, a vocabulary size and three special ids, so both
kinds implement the same :class:`Tokenizer` protocol. A checkpoint stores the tokenizer with
:meth:`Tokenizer.save` (files plus a small JSON-able spec) and gets it back with
:func:`tokenizer_from_saved`, so a trained model never depends on where its tokenizer came from.

The byte tokenizer is the default because it needs no files, no training and no network, and
it can represent any text exactly.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.errors import MultitokenError

TOKENIZER_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 300  # 256 byte symbols + specials + a few merges; below this BPE is pointless.

# Special-token spellings used by common model families, most specific first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>", "[CLS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the package needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens; invalid UTF-8 becomes U+FFFD."""
        ...

    def save(self, directory: Path) -> dict:
        """Write the files this tokenizer needs into ``directory``; return a JSON-able spec."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256, 257, 258 are ``<bos>``, ``<eos>``, ``<pad>``."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special (and out-of-range) ids are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        """Nothing to write: the spec alone rebuilds a byte tokenizer."""
        return {"type": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its bos/eos/pad ids resolved.

    Special tokens are passed by spelling (``eos`` etc.) when known, e.g. from a saved spec or a
    ``tokenizer_config.json``; otherwise they are guessed from common names. Only eos is
    mandatory, because the packer separates documents with it; bos and pad fall back to eos.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = self._find(eos, EOS_NAMES)
        if eos_id is None:
            raise MultitokenError(
                f"{source} has no end-of-text token (looked for {', '.join(EOS_NAMES)})",
                flag="--tokenizer",
            )
        self.eos_id = eos_id
        bos_id = self._find(bos, BOS_NAMES)
        self.bos_id = eos_id if bos_id is None else bos_id
        pad_id = self._find(pad, PAD_NAMES)
        self.pad_id = eos_id if pad_id is None else pad_id

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
    ) -> HFTokenizer:
        """Load a ``tokenizer.json``; any read or parse failure becomes a ``--tokenizer`` error."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise MultitokenError(f"cannot read {path}: {exc.strerror}", "--tokenizer") from exc
        try:
            tok = tokenizers.Tokenizer.from_buffer(data)
        # The Rust extension raises plain ``Exception`` for every malformed file.
        except Exception as exc:
            reason = " ".join(str(exc).split())  # keep the message on one line
            raise MultitokenError(
                f"{path} is not a valid tokenizer.json: {reason}", "--tokenizer"
            ) from exc
        return cls(tok, bos=bos, eos=eos, pad=pad, source=str(path))

    def _find(self, preferred: str | None, names: Sequence[str]) -> int | None:
        """Id of ``preferred`` if it exists, else of the first of ``names`` that does."""
        for name in (preferred, *names) if preferred else names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Ids without the post-processor's bos/eos: the packer places specials itself."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the library's byte-level decoder already replaces invalid UTF-8."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: Path) -> dict:
        """Write ``tokenizer.json``; the spec pins the special tokens so loading never re-guesses."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        return {
            "type": "hf",
            "file": TOKENIZER_FILE,
            "bos": self._tok.id_to_token(self.bos_id),
            "eos": self._tok.id_to_token(self.eos_id),
            "pad": self._tok.id_to_token(self.pad_id),
        }

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def tokenizer_from_saved(directory: Path, spec: dict) -> Tokenizer:
    """Rebuild the tokenizer that :meth:`Tokenizer.save` wrote into ``directory``."""
    kind = spec.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(
            Path(directory) / spec.get("file", TOKENIZER_FILE),
            bos=spec.get("bos"),
            eos=spec.get("eos"),
            pad=spec.get("pad"),
        )
    raise MultitokenError(f"unknown saved tokenizer type {kind!r} in {directory}", "--tokenizer")


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None``/``"bytes"``: the byte tokenizer; otherwise a tokenizer.json or a folder with one.

    A folder may be a local transformers model directory; its ``tokenizer_config.json``, when
    present, names the special tokens more reliably than guessing from common spellings.
    """
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        config = _special_tokens_from_config(path / "tokenizer_config.json")
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise MultitokenError(f"no {TOKENIZER_FILE} in folder {path.parent}", "--tokenizer")
        return HFTokenizer.from_file(path, **config)
    if not path.is_file():
        raise MultitokenError(f"no such tokenizer file or folder: {spec}", "--tokenizer")
    return HFTokenizer.from_file(path)


def _special_tokens_from_config(path: Path) -> dict[str, str]:
    """``bos``/``eos``/``pad`` spellings from a transformers ``tokenizer_config.json``, if any."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # Optional file: a missing or odd config just means we guess by name.
    found = {}
    for key in ("bos", "eos", "pad"):
        value = config.get(f"{key}_token") if isinstance(config, dict) else None
        if isinstance(value, dict):  # older configs store AddedToken objects
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> HFTokenizer:
    """Fit a byte-level BPE on ``texts`` and write it atomically to ``out`` (a tokenizer.json).

    Byte-level means every string is encodable (no unknown token). ``<|endoftext|>`` doubles as
    bos and eos, GPT-2 style. The file is written to a temporary name and renamed, so a crash
    mid-write never leaves a truncated tokenizer that a later run would pick up.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise MultitokenError(
            f"BPE vocabulary size {vocab_size} is too small (minimum {MIN_BPE_VOCAB})",
            "--vocab-size",
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return HFTokenizer(tok, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", source=str(out))
