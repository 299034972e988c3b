"""Packing (multitoken.training.packing): documents as one stream with the tokenizer's specials around
each and eos between them, rows that overlap by exactly one token, per-file rows that never span
two files, states that only resume the stream they came from, and bad sizes refused by flag.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import (
    BOS,
    BOS_BYTES,
    BOS_CHAT,
    BPE_CORPUS,
    EOS,
    chat_ids,
    expected_tokens,
    make_files,
    theirs,
    unpack,
    write_corpus,
    write_tokenizer,
)

from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import byte_level_backend
from multitoken.text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from multitoken.training.data import Corpus, Piece
from multitoken.training.packing import PackedStream, document_ids, validation_batches

TOK = ByteTokenizer()
# Byte ids, but a whole text gets <bos> (256) before it and <eos> (257) after it.
AROUND = HFTokenizer(
    byte_level_backend(), eos="<eos>", added_specials={"prefix": ["<bos>"], "suffix": ["<eos>"]}
)


def files_of(folder: Path, count: int = 3, repeat: int = 5) -> list[Path]:
    """``count`` files, file i spelled with one letter of its own (x, y, z, ...) and newlines."""
    texts = [(chr(ord("x") + i) * (7 + i) + "\n") * repeat for i in range(count)]
    return sorted(write_corpus(folder, texts).iterdir())


# --- documents --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("starts", "ends", "want"),
    [
        (True, True, ["prefix", "text", "suffix"]),  # a whole document
        (True, False, ["prefix", "text"]),  # its first block
        (False, False, ["text"]),  # a block in the middle
        (False, True, ["text", "suffix"]),  # its last block
    ],
)
def test_a_documents_specials_go_before_its_first_piece_and_after_its_last(starts, ends, want):
    text = AROUND.encode("héllo")
    parts = {"prefix": [AROUND.bos_id], "text": text, "suffix": [AROUND.eos_id]}
    expected = [token for part in want for token in parts[part]]
    # the suffix already ends with eos, so no second eos separates the documents
    assert document_ids(Piece("héllo", starts, ends), AROUND) == expected


def test_eos_separates_documents_when_the_tokenizer_adds_none():
    assert document_ids(Piece("ab", True, True), TOK) == [97, 98, TOK.eos_id]
    assert document_ids(Piece("ab", True, False), TOK) == [97, 98]


def test_a_rendered_chat_gets_no_specials_but_still_its_separator():
    piece = Piece("<bos>hi", True, True, add_special_tokens=False)
    assert document_ids(piece, AROUND) == [*AROUND.encode("<bos>hi"), AROUND.eos_id]


# --- rows -------------------------------------------------------------------------------------


def test_rows_overlap_by_exactly_one_token_within_and_across_batches(tmp_path: Path):
    stream = PackedStream(files_of(tmp_path), TOK, 7, 3, loop=False, shuffle=False)
    batches = list(stream)
    assert len(batches) >= 2 and all(batch.shape == (3, 8) for batch in batches)
    rows = [row.tolist() for batch in batches for row in batch]
    assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:]))


def test_one_pass_drops_the_last_partial_batch(tmp_path: Path):
    files = files_of(tmp_path)
    total = len(unpack(list(PackedStream(files, TOK, 7, 1, loop=False, shuffle=False))))
    rows = (total - 1) // 7  # every row after the first adds seq_len new tokens
    batches = list(PackedStream(files, TOK, 7, 4, loop=False, shuffle=False))
    assert len(batches) == rows // 4 and rows % 4  # a partial batch was there to drop


def test_per_file_rows_never_span_two_files(tmp_path: Path):
    files = files_of(tmp_path, count=3, repeat=4)
    stream = PackedStream(files, TOK, 9, 1, loop=False, shuffle=False, per_file=True)
    rows = [row[0].tolist() for row in stream]
    letters = [set(TOK.decode([t for t in row if t != TOK.eos_id])) - {"\n"} for row in rows]
    assert len(rows) >= 6 and all(len(found) == 1 for found in letters), letters
    assert {letter for found in letters for letter in found} == {"x", "y", "z"}
    # each file is cut on its own from its first token
    assert rows[0] == TOK.encode(files[0].read_text())[:10]


# --- states and bad input ---------------------------------------------------------------------


def test_a_state_resumes_only_the_same_files_and_rank(tmp_path: Path):
    files = files_of(tmp_path, count=4)
    state = json.loads(json.dumps(PackedStream(files, TOK, 8, 1).state_dict()))
    for other in (
        PackedStream(files[:3], TOK, 8, 1),
        PackedStream(files, TOK, 8, 1, rank=1, world_size=2),
    ):
        with pytest.raises(MultitokenError, match="data stream state is for") as err:
            other.load_state_dict(state)
        assert err.value.flag == "--resume"


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"seq_len": 0}, "--seq-len"),
        ({"batch_size": 0}, "--batch-size"),
        ({"rank": 0, "world_size": 4}, "--data"),  # three files cannot feed four ranks
    ],
)
def test_bad_sizes_are_refused_naming_the_flag(tmp_path: Path, options: dict, flag: str):
    values = {"seq_len": 8, "batch_size": 2, **options}
    with pytest.raises(MultitokenError) as err:
        PackedStream(files_of(tmp_path), TOK, **values)
    assert err.value.flag == flag


def test_a_rank_outside_the_world_is_a_programming_error(tmp_path: Path):
    with pytest.raises(ValueError, match="outside world size"):
        PackedStream(files_of(tmp_path), TOK, 8, 1, rank=2, world_size=2)


def test_no_validation_batches_asked_gives_none_even_from_a_tiny_split(tmp_path: Path):
    tiny = write_corpus(tmp_path / "c", ["x"]) / "f0.txt"
    corpus = Corpus(train_files=[], val_files=[tiny])
    assert validation_batches(corpus, TOK, 64, 4, max_batches=0) == []
    with pytest.raises(MultitokenError, match="validation split is too small"):
        validation_batches(corpus, TOK, 64, 4, max_batches=1)


# --- whole documents, block by block, epochs, resumption, ranks, validation ---------------


def take(stream: PackedStream, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(stream, count))


@pytest.mark.parametrize("tok", [TOK, BOS_BYTES], ids=["bytes", "bos"])
@pytest.mark.parametrize("block_bytes", [1 << 20, 16, 7])
def test_rows_round_trip_to_documents(tmp_path: Path, block_bytes: int, tok: Tokenizer) -> None:
    files = make_files(tmp_path)
    seq_len = 9
    stream = PackedStream(
        files, tok, seq_len, 2, loop=False, shuffle=False, block_bytes=block_bytes
    )
    batches = list(stream)
    assert all(batch.shape == (2, seq_len + 1) and batch.dtype == torch.long for batch in batches)
    got, want = unpack(batches), expected_tokens(files, tok)
    assert got == want[: len(got)]
    assert len(want) - len(got) < 2 * seq_len  # only the last partial batch is dropped


def test_shuffled_epochs_follow_the_seeded_order(tmp_path: Path) -> None:
    files = make_files(tmp_path)
    order = list(range(len(files)))
    random.Random(3 + 0).shuffle(order)
    stream = PackedStream(files, TOK, 5, 1, seed=3, loop=False)
    got = unpack(list(stream))
    assert got == expected_tokens([files[i] for i in order])[: len(got)]


@pytest.mark.parametrize("tok", [TOK, BOS_BYTES], ids=["bytes", "bos"])
@pytest.mark.parametrize("block_bytes", [1 << 20, 13])
def test_resume_yields_exactly_the_same_batches(
    tmp_path: Path, block_bytes: int, tok: Tokenizer
) -> None:
    files = make_files(tmp_path, count=4)
    kwargs = dict(seq_len=6, batch_size=3, seed=7, block_bytes=block_bytes)
    reference = take(PackedStream(files, tok, **kwargs), 120)
    for before in [0, 1, 5, 17, 40, 77]:
        stream = PackedStream(files, tok, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(take(stream, before), reference))
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = PackedStream(files, tok, **kwargs)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        for a, b in zip(take(resumed, 30), reference[before : before + 30]):
            assert torch.equal(a, b)
    assert stream.state_dict()["epoch"] >= 2  # the checks above crossed epoch boundaries


def test_state_is_small(tmp_path: Path) -> None:
    files = make_files(tmp_path, count=2)
    stream = PackedStream(files, TOK, 8, 2)
    take(stream, 3)
    assert len(stream.state_dict()["carry"]) <= 8


def test_ranks_read_disjoint_files(tmp_path: Path) -> None:
    files = make_files(tmp_path, count=6)
    seen = []
    for rank in (0, 1):
        stream = PackedStream(files, TOK, 8, 1, seed=5, rank=rank, world_size=2, loop=False)
        text = TOK.decode(unpack(list(stream)))
        seen.append({i for i in range(len(files)) if f"FILE{i} " in text})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(files)))


def test_corpus_too_small_for_seq_len(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("tiny")
    with pytest.raises(MultitokenError, match="too small for --seq-len 64"):
        next(PackedStream([path], TOK, 64, 1))


def test_validation_batches_are_fixed_and_seed_independent(tmp_path: Path) -> None:
    make_files(tmp_path / "c", count=20)
    corpus = Corpus.from_specs([str(tmp_path / "c")], val_fraction=0.3)
    first = validation_batches(corpus, TOK, 8, 4, max_batches=3)
    second = validation_batches(corpus, TOK, 8, 4, max_batches=3)
    assert len(first) == 3 and all(batch.shape == (4, 9) for batch in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    want = expected_tokens(corpus.val_files)
    got = unpack(first)
    assert got == want[: len(got)]


def test_validation_falls_back_to_a_smaller_batch(tmp_path: Path) -> None:
    make_files(tmp_path / "c", count=2)
    corpus = Corpus(train_files=[], val_files=[tmp_path / "c" / "doc0.txt"])
    (batch,) = validation_batches(corpus, TOK, 40, 64, max_batches=5)
    assert 1 <= batch.shape[0] < 64 and batch.shape[1] == 41
    with pytest.raises(MultitokenError, match="validation split is too small"):
        validation_batches(corpus, TOK, 4000, 64, max_batches=5)


# --- training documents start as prompts do (transformers is the reference) -------------------


def test_packed_documents_start_with_the_tokenizers_bos(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tok", "template-bos")
    tok = load_tokenizer(str(tmp_path / "tok"))
    hf = theirs(tmp_path / "tok")
    rendered = tok.apply_chat_template(BOS_CHAT, add_generation_prompt=False)
    records = [
        {"text": BPE_CORPUS[0]},
        {"messages": BOS_CHAT},
        {"messages": BOS_CHAT, "text": rendered},
    ]
    jsonl = tmp_path / "docs" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    long = tmp_path / "docs" / "b.txt"  # read in several blocks: one BOS, at its start
    long.write_text("".join(BPE_CORPUS[:20]))
    chat = chat_ids(hf, add_generation_prompt=False)
    want = [
        *hf(BPE_CORPUS[0])["input_ids"], EOS,
        *chat, EOS,  # a chat and a distilled chat: the template's BOS only
        *chat, EOS,
        *hf("".join(BPE_CORPUS[:20]))["input_ids"], EOS,
    ]  # fmt: skip
    assert want[0] == BOS and chat.count(BOS) == 1
    stream = PackedStream([jsonl, long], tok, 16, 1, loop=False, shuffle=False, block_bytes=256)
    got = unpack(list(stream))
    assert got == want[: len(got)] and len(want) - len(got) < 16
    assert got.count(BOS) == 4
