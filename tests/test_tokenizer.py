"""Byte and Hugging Face tokenizers: round trips, special ids, saving and BPE training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models

from multitoken.errors import MultitokenError
from multitoken.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_saved,
    train_bpe,
)

TEXT = "Hello, wörld! Ünïcödé → 数字 😀\nsecond line\ttab\n"
CORPUS = [f"def function_{i}(x, y):\n    return x * {i} + y  # café ✓\n" for i in range(150)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    return train_bpe(CORPUS, 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_bytes_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TEXT
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated UTF-8 is replaced, not an error
    assert isinstance(tok, Tokenizer)


def test_load_tokenizer_defaults_to_bytes(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    spec = ByteTokenizer().save(tmp_path)
    assert json.loads(json.dumps(spec)) == {"type": "bytes"}
    assert isinstance(tokenizer_from_saved(tmp_path, spec), ByteTokenizer)


def test_train_bpe_round_trips_and_respects_vocab(bpe: HFTokenizer, tmp_path: Path) -> None:
    assert bpe.vocab_size <= 400
    assert bpe.eos_id == bpe.bos_id != bpe.pad_id
    for text in (TEXT, CORPUS[3], ""):
        ids = bpe.encode(text)
        assert bpe.eos_id not in ids
        assert bpe.decode(ids) == text
    assert len(bpe.encode(CORPUS[7])) < len(CORPUS[7].encode("utf-8"))  # merges were learned
    assert bpe.decode([bpe.eos_id, *bpe.encode("ab"), bpe.pad_id]) == "ab"


def test_train_bpe_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(MultitokenError, match="--vocab-size"):
        train_bpe(CORPUS, 100, tmp_path / "t.json")
    assert not list(tmp_path.iterdir())


def test_hf_save_and_load_round_trip(bpe: HFTokenizer, tmp_path: Path) -> None:
    spec = bpe.save(tmp_path / "ckpt")
    spec = json.loads(json.dumps(spec))
    assert spec["type"] == "hf" and (tmp_path / "ckpt" / spec["file"]).is_file()
    again = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id) == (
        bpe.vocab_size,
        bpe.bos_id,
        bpe.eos_id,
        bpe.pad_id,
    )
    assert again.encode(TEXT) == bpe.encode(TEXT)


def test_load_tokenizer_from_file_or_model_folder(bpe: HFTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    from_file = load_tokenizer(str(tmp_path / "tokenizer.json"))
    from_folder = load_tokenizer(str(tmp_path))
    assert from_file.encode(TEXT) == from_folder.encode(TEXT) == bpe.encode(TEXT)
    assert from_folder.eos_id == bpe.eos_id
    # A transformers tokenizer_config.json names the specials explicitly.
    config = {"eos_token": {"content": "<pad>"}, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    configured = load_tokenizer(str(tmp_path))
    assert (configured.eos_id, configured.pad_id) == (bpe.pad_id, bpe.eos_id)


def test_encode_adds_no_post_processor_specials(tmp_path: Path) -> None:
    tok = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2}, unk_token="</s>"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    wrapped = HFTokenizer(tok)
    assert (wrapped.bos_id, wrapped.eos_id, wrapped.pad_id) == (0, 1, 1)
    assert wrapped.encode("hi hi") == [2, 2]


@pytest.mark.parametrize("content", [None, "{not json", '{"model": 1}'])
def test_bad_tokenizer_paths(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MultitokenError, match="--tokenizer") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(MultitokenError, match="--tokenizer"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_without_eos_is_rejected(tmp_path: Path) -> None:
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MultitokenError, match="no end-of-text token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
