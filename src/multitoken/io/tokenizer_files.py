"""Tokenizers as files plain ``transformers.AutoTokenizer`` loads, for exported model folders.

A model exported with ``multitoken export --trunk-only`` (and every checkpoint's ``trunk/``) must
load without multitoken, so its tokenizer is written as ``tokenizer.json`` +
``tokenizer_config.json``. For the byte tokenizer that needs an equivalent ``tokenizers`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from multitoken.io.atomic import write_json_atomic, write_text_atomic
from multitoken.text.tokenizer import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
)


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Write ``tokenizer`` into ``folder`` so ``transformers.AutoTokenizer`` loads an equivalent.

    Writes ``tokenizer.json``, a ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``,
    bos/eos/pad, the chat template if any) and nothing else, so it can go beside a model's own
    files. The byte tokenizer becomes a ``tokenizers`` BPE without merges over the 256
    byte-level symbols (see :func:`byte_level_backend`), with ``split_special_tokens`` so a
    ``"<eos>"`` typed in text stays five bytes, as it is for :class:`ByteTokenizer`.

    bos and pad are always written, even where they stand in for eos (the ids the trunk's config
    was built with). A template that uses ``bos_token`` therefore renders it after export even
    when the original tokenizer had no bos of its own.

    What goes around a whole text (``tokenizer.added_specials``) is in ``tokenizer.json``'s
    post-processor, which is where transformers 5 reads it from; ``add_bos_token`` is not
    written, since transformers ignores it beside a ``tokenizer.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        backend = byte_level_backend()
        specials = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
        split, template = True, None
    elif isinstance(tokenizer, HFTokenizer):
        backend, specials = tokenizer.backend, tokenizer.special_tokens()
        split, template = tokenizer.split_special_tokens, tokenizer.chat_template
    else:
        raise TypeError(f"cannot write {tokenizer!r} as a transformers tokenizer")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{key}_token": value for key, value in specials.items()},
        # Our decode never tidies spaces around punctuation; transformers must not either.
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": split,
    }
    if template is not None:
        # In the config rather than chat_template.jinja: every transformers since 4.34 reads it.
        config["chat_template"] = template
    write_text_atomic(folder / TOKENIZER_FILE, backend.to_str(pretty=True))
    write_json_atomic(folder / CONFIG_FILE, config, ensure_ascii=False)


def byte_level_backend() -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes exactly like :class:`ByteTokenizer`.

    A BPE model with no merges whose vocabulary maps each byte's byte-level symbol (GPT-2's
    printable stand-in for that byte) to the byte's value, so every byte of the text becomes
    one token with id = byte value; the ByteLevel pre-tokenizer turns text into those symbols
    without splitting it into words or adding a leading space, and the ByteLevel decoder turns
    them back into bytes. ``<bos>``, ``<eos>``, ``<pad>`` are added as specials 256, 257, 258.
    """
    symbols = _byte_symbols()
    vocab = {symbols[byte]: byte for byte in range(256)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in _BYTE_SPECIALS])
    return tok


_BYTE_SPECIALS = ("<bos>", "<eos>", "<pad>")  # ids 256, 257, 258, as in ByteTokenizer


def _byte_symbols() -> list[str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes
    (controls, space, 0x7F-0xA0, 0xAD) for code points from 256 upwards, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols
