"""Corpus discovery and splitting, and reading documents from files and JSONL records
(multitoken.training.data); packing them into rows is in test_packing.py."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from helpers import BOS_BYTES, make_files, unpack

from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import byte_level_backend
from multitoken.text.tokenizer import ByteTokenizer, HFTokenizer
from multitoken.training.data import Corpus, iter_texts, resolve_sources, split_files, stdlib_files
from multitoken.training.packing import PackedStream

TOK = ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Finding and splitting files


def test_stdlib_files_are_library_sources_without_tests() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert 300 < len(files) < 3000
    assert root / "os.py" in files
    assert root / "json" / "__init__.py" in files
    assert files == sorted(files)
    for path in files:
        folders = path.relative_to(root).parts[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(folders)
        assert not any(folder.startswith("test_") for folder in folders)


def test_resolve_sources_files_folders_and_globs(tmp_path: Path) -> None:
    files = make_files(tmp_path / "a")
    (tmp_path / "a" / "empty.txt").write_text("")
    (tmp_path / "a" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "a" / ".hidden" / "secret.txt").write_text("skip me")
    expected = [path.resolve() for path in files]
    assert resolve_sources([str(tmp_path / "a")]) == expected
    assert resolve_sources([str(tmp_path / "**" / "*.txt"), str(files[0])]) == expected


def test_resolve_sources_missing_path_names_it_and_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "*.txt"
    with pytest.raises(MultitokenError) as info:
        resolve_sources([str(missing)])
    assert str(missing) in str(info.value)
    assert info.value.flag == "--data"


def test_resolve_sources_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MultitokenError, match="no non-empty text files"):
        resolve_sources([str(tmp_path)])


def test_split_is_deterministic_disjoint_and_location_independent(tmp_path: Path) -> None:
    files = make_files(tmp_path / "here", count=40)
    train, val = split_files(files, 0.25, tmp_path / "here")
    assert (train, val) == split_files(list(reversed(files)), 0.25, tmp_path / "here")
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(files)
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "here", moved)
    train2, _ = split_files(sorted(moved.iterdir()), 0.25, moved)
    assert [path.name for path in train2] == [path.name for path in train]


@pytest.mark.parametrize("fraction", [1e-9, 0.999999])
def test_split_keeps_both_sides_non_empty(tmp_path: Path, fraction: float) -> None:
    train, val = split_files(make_files(tmp_path, count=3), fraction, tmp_path)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == 3


def test_corpus_defaults_to_stdlib() -> None:
    corpus = Corpus.from_specs(None)
    assert corpus.train_files and corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus == Corpus.from_specs([])
    assert corpus.stream_kwargs("train") == {}


def test_single_file_corpus_splits_by_bytes(tmp_path: Path) -> None:
    path = tmp_path / "only.txt"
    path.write_text("".join(f"line {i} ünïcode\n" for i in range(200)), encoding="utf-8")
    corpus = Corpus.from_specs([str(path)], val_fraction=0.1)
    assert corpus.train_files == corpus.val_files == [path.resolve()]
    texts = []
    for split in ("train", "val"):
        kwargs = corpus.stream_kwargs(split)
        # seq_len 1: rows of two tokens overlapping by one, so no token is left over.
        stream = PackedStream([path], TOK, 1, 1, loop=False, shuffle=False, **kwargs)
        texts.append(TOK.decode(unpack(list(stream))))
    whole = path.read_text(encoding="utf-8")
    assert texts[0] + texts[1] == whole
    assert 0.85 < len(texts[0]) / len(whole) < 0.95
    # The document starts in the training part; the validation part continues it: no <bos>.
    starts = []
    for split in ("train", "val"):
        kwargs = corpus.stream_kwargs(split)
        stream = PackedStream([path], BOS_BYTES, 1, 1, loop=False, shuffle=False, **kwargs)
        ids = unpack(list(stream))
        starts.append((ids[0] == BOS_BYTES.bos_id, ids.count(BOS_BYTES.bos_id)))
    assert starts == [(True, 1), (False, 0)]


def test_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "hello"}, {"text": "wörld", "meta": 1}]
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    stream = PackedStream([path], TOK, 3, 1, loop=False)
    want = TOK.encode("hello") + [TOK.eos_id] + TOK.encode("wörld") + [TOK.eos_id]
    got = unpack(list(stream))
    assert got == want[: len(got)] and len(want) - len(got) < 3


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"body": "x"}', 'has no "text" string, "messages" list or "conversations" list'),
        ('{"conversations": [{"from": "tool", "value": "x"}]}', "unknown ShareGPT speaker"),
        ('{"messages": "hi"}', '"messages" must be a non-empty list'),
        ('{"messages": [{"content": "no role"}]}', '"messages" must be a non-empty list'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(MultitokenError) as info:
        next(PackedStream([path], TOK, 2, 1))
    assert info.value.flag == "--data"
    assert f"{path}:3" in str(info.value) and reason in str(info.value)
    assert "\n" not in str(info.value)


# A byte-level HF tokenizer (ids = bytes, so expected ids are easy to write) with a chat template
# that uses a special token: "<eos>" in the rendered text must become the eos id, not 5 bytes.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
CHAT_TOK = HFTokenizer(
    byte_level_backend(), eos="<eos>", chat_template=CHAT_TEMPLATE, source="chat-tok"
)


def test_jsonl_chat_records_are_rendered_with_the_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "hï"}, {"role": "assistant", "content": "yo"}]
    lines = [{"messages": chat}, {"text": "plain"}, {"messages": chat, "text": "text wins"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    eos = CHAT_TOK.eos_id
    want = [
        *b"<user>h\xc3\xaf", eos, *b"<assistant>yo", eos, eos,  # the record, then the packer's eos
        *b"plain", eos,
        *b"text wins", eos,
    ]  # fmt: skip
    got = unpack(list(PackedStream([path], CHAT_TOK, 4, 1, loop=False)))
    assert got == want[: len(got)] and len(want) - len(got) < 4
    # Without a tokenizer (fitting one) a chat is its contents, one message per line.
    assert list(iter_texts([path])) == ["hï\nyo", "plain", "text wins"]
    assert list(iter_texts([path], tokenizer=CHAT_TOK))[0] == "<user>hï<eos><assistant>yo<eos>"


def test_chat_records_need_a_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text('{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(MultitokenError) as info:
        next(PackedStream([path], TOK, 2, 1))
    message = str(info.value)
    assert f"{path}:2" in message and "the byte tokenizer has no chat template" in message
    assert message.startswith(f"{path}:2: ") and "\n" not in message
    assert info.value.flag == "--tokenizer"
    # A template that refuses the messages is reported at the line too.
    strict = HFTokenizer(
        byte_level_backend(),
        eos="<eos>",
        chat_template="{{ raise_exception('no system role') }}",
        source="strict-tok",
    )
    with pytest.raises(MultitokenError, match=f"{path}:2: the chat template of strict-tok failed"):
        next(PackedStream([path], strict, 2, 1))


def test_iter_texts_yields_whole_files_in_pieces(tmp_path: Path) -> None:
    files = make_files(tmp_path, count=3)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    texts = list(iter_texts([*files, jsonl]))
    assert "".join(texts) == "".join(path.read_text(encoding="utf-8") for path in files) + "ab"
