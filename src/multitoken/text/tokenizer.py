"""Tokenizers behind one small interface: raw UTF-8 bytes, or any Hugging Face ``tokenizer.json``.

Training code only needs ids in, ids out, a vocabulary size, three special ids and, for chat
data, a way to render messages as text, so both kinds implement the same :class:`Tokenizer`
protocol. A checkpoint stores the tokenizer with :meth:`Tokenizer.save` (files plus a small
JSON-able spec) and gets it back with :func:`tokenizer_from_saved`, so a trained model never
depends on where its tokenizer came from. :mod:`multitoken.io.tokenizer_files` goes the other
way: it writes any of them as files plain ``transformers.AutoTokenizer`` loads.

The tokenizers themselves (the protocol, its two kinds, and which special tokens go around a
text) are :mod:`multitoken.text.tokenizer_kinds`, named here too; this module finds, loads,
rebuilds and trains them.

Chat templates travel with an ``HFTokenizer`` (read from the folder, kept in checkpoints) and are
rendered by :mod:`multitoken.text.chat`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.errors import MultitokenError
from multitoken.io.atomic import atomic_path
from multitoken.io.gguf import gguf_tokenizer_parts
from multitoken.quiet import quiet_transformers
from multitoken.text.chat import ChatTemplateError
from multitoken.text.tokenizer_kinds import (
    BOS_NAMES,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    EOS_NAMES,
    PAD_NAMES,
    TOKENIZER_FILE,
    AddedSpecials,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
)

# The tokenizers and their constants are tokenizer_kinds'; named here as well, so that
# everything about tokenizers is one import away, as before they had a module of their own
__all__ = [
    "BOS_NAMES",
    "CHAT_TEMPLATE_FILE",
    "CONFIG_FILE",
    "EOS_NAMES",
    "MIN_BPE_VOCAB",
    "PAD_NAMES",
    "TOKENIZER_FILE",
    "AddedSpecials",
    "ByteTokenizer",
    "ChatTemplateError",
    "HFTokenizer",
    "Tokenizer",
    "load_gguf_tokenizer",
    "load_tokenizer",
    "tokenizer_from_saved",
    "train_bpe",
]

MIN_BPE_VOCAB = 300  # 256 byte symbols + specials + a few merges; below this BPE is pointless.


def tokenizer_from_saved(directory: Path, spec: dict) -> Tokenizer:
    """Rebuild the tokenizer that :meth:`Tokenizer.save` wrote into ``directory``.

    A spec from before ``added_specials`` was saved describes a checkpoint that was trained and
    prompted with nothing added around texts, so it keeps encoding that way."""
    kind = spec.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(
            Path(directory) / spec.get("file", TOKENIZER_FILE),
            bos=spec.get("bos"),
            eos=spec.get("eos"),
            pad=spec.get("pad"),
            chat_template=spec.get("chat_template"),
            split_special_tokens=bool(spec.get("split_special_tokens", False)),
            added_specials=_saved_added_specials(spec, directory),
        )
    raise MultitokenError(f"unknown saved tokenizer type {kind!r} in {directory}", "--tokenizer")


def _saved_added_specials(spec: dict, directory: Path) -> dict[str, list[str]]:
    """A spec's ``added_specials``, checked; none saved (an older spec) means nothing added."""
    value = spec.get("added_specials", {"prefix": [], "suffix": []})
    if not (
        isinstance(value, dict)
        and all(
            isinstance(value.get(key, []), list)
            and all(isinstance(t, str) for t in value.get(key, []))
            for key in ("prefix", "suffix")
        )
    ):
        raise MultitokenError(f"malformed added_specials in {directory}", "--tokenizer")
    return value


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None``/``"bytes"``: the byte tokenizer; otherwise a tokenizer.json or a model folder.

    A folder is a local transformers model directory. Its ``tokenizer.json`` is used when there
    is one, with the special tokens, chat template and ``split_special_tokens`` its
    ``tokenizer_config.json`` (and ``chat_template.jinja``) name, which are more reliable than
    guessing from common spellings. A folder without ``tokenizer.json`` (e.g. only
    ``vocab.json`` + ``merges.txt``) is handed to ``AutoTokenizer``, and its fast tokenizer's
    backend is used. Nothing is downloaded.
    """
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():  # a GGUF's vocabulary is in its metadata
        return load_gguf_tokenizer(path)
    if path.is_dir():
        options = _options_from_config(path)
        if (path / TOKENIZER_FILE).is_file():
            return HFTokenizer.from_file(path / TOKENIZER_FILE, **options)
        return _tokenizer_via_transformers(path, options)
    if not path.is_file():
        raise MultitokenError(f"no such tokenizer file or folder: {spec}", "--tokenizer")
    return HFTokenizer.from_file(path)


def _tokenizer_via_transformers(folder: Path, options: dict[str, Any]) -> HFTokenizer:
    """A folder's tokenizer as transformers builds it (e.g. from vocab + merges files)."""
    missing = MultitokenError(
        f"{folder} has no tokenizer (no {TOKENIZER_FILE} and none transformers can load "
        "offline); pass --tokenizer",
        "--tokenizer",
    )
    if not any(folder.iterdir()):
        raise missing
    from transformers import AutoTokenizer

    try:
        with quiet_transformers(warnings=False):  # its advice on missing files: not our one line
            auto = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # Any failure (missing files, unknown class, absent sentencepiece, ...) means the same thing
    # to the user: this folder does not give a tokenizer we can use.
    except Exception:
        raise missing from None
    backend = getattr(auto, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise missing
    for key in ("bos", "eos", "pad"):  # the loaded object has resolved special_tokens_map.json too
        value = getattr(auto, f"{key}_token", None)
        if isinstance(value, str) and value:
            options[key] = value
    template = getattr(auto, "chat_template", None)
    if isinstance(template, str) and template and not options.get("chat_template"):
        options["chat_template"] = template
    return HFTokenizer(backend, source=str(folder), **options)


def _options_from_config(folder: Path) -> dict[str, Any]:
    """:class:`HFTokenizer` keyword arguments from a transformers model folder's config files:
    ``bos``/``eos``/``pad`` spellings, ``chat_template``, ``split_special_tokens``."""
    config = _read_json_object(folder / CONFIG_FILE)
    found: dict[str, Any] = {}
    for key in ("bos", "eos", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):  # older configs store AddedToken objects
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    template = _template_from_config(config.get("chat_template"))
    try:  # the separate file is what current transformers writes, and it wins over the entry
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    except OSError:
        pass
    if template:
        found["chat_template"] = template
    if config.get("split_special_tokens") is True:
        found["split_special_tokens"] = True
    return found


def _read_json_object(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # Optional file: a missing or odd config just means we guess by name.
    return config if isinstance(config, dict) else {}


def _template_from_config(value: object) -> str | None:
    """A config's ``chat_template``: a string, or a list of ``{name, template}`` of which
    transformers uses the one named ``default``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) else None
    return None


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
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return HFTokenizer(tok, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", source=str(out))


def load_gguf_tokenizer(path: str | Path, flag: str = "--tokenizer") -> HFTokenizer:
    """The tokenizer a GGUF file describes, with its special tokens and chat template."""
    backend, special, template = gguf_tokenizer_parts(path, flag)
    try:
        return HFTokenizer(backend, source=str(path), chat_template=template, **special)
    except MultitokenError as exc:  # e.g. no end-of-text token: said of the flag given
        raise MultitokenError(exc.message, flag) from None
