"""Incremental detokenization (multitoken.serve.detokenize): what a client is sent, token by
token, equals the whole text; half a UTF-8 character and half a stop string are held back; a
stop string cuts the text before it; a stop token is not text."""

from __future__ import annotations

import pytest

from multitoken.serve.detokenize import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(served_model):
    return served_model.tokenizer


def feed(detok: Detokenizer, ids: list[int], final_stop: int | None = None) -> list[str]:
    """``ids`` one token at a time (the last event final, with ``final_stop`` appended)."""
    pieces = [detok.add([t]) for t in ids[:-1]]
    last = ids[-1:] + ([final_stop] if final_stop is not None else [])
    return pieces + [detok.add(last, final=True)]


def test_pieces_add_up_to_the_whole_text_and_never_hold_half_a_character(tokenizer):
    text = "héllo wörld €😀 and more €"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the multi-byte characters take several tokens each
    pieces = feed(Detokenizer(tokenizer), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_stop_string_across_tokens_cuts_the_text_before_it(tokenizer):
    ids = tokenizer.encode("def area(width): return width")
    detok = Detokenizer(tokenizer, stop=["): ret"])
    pieces = feed(detok, ids)
    assert "".join(pieces) == "def area(width"
    assert detok.stopped
    # nothing of the stop string was ever sent, not even its first character
    assert all(")" not in p for p in pieces)
    assert detok.add(tokenizer.encode(" more")) == ""


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    detok = Detokenizer(tokenizer, stop=["width", "area"])
    assert "".join(feed(detok, tokenizer.encode("def area(width)"))) == "def "


def test_a_held_back_prefix_is_released_when_the_stop_string_does_not_follow(tokenizer):
    detok = Detokenizer(tokenizer, stop=["the end"])
    ids = tokenizer.encode("to the edge")
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == "to the edge"  # "the e" was held, then let go
    detok2 = Detokenizer(tokenizer, stop=["the end"])
    ids2 = tokenizer.encode("go to the e")
    assert "".join(feed(detok2, ids2)) == "go to the e"  # the end of the text releases it


def test_a_stop_token_ends_the_text_and_still_counts(tokenizer):
    eos = tokenizer.eos_id
    ids = tokenizer.encode("the end")
    detok = Detokenizer(tokenizer, stop_ids={eos})
    pieces = feed(detok, ids, final_stop=eos)
    assert "".join(pieces) == "the end"
    assert detok.tokens == len(ids) + 1
    assert not detok.stopped  # a stop token is the engine's finish, not a stop string


def test_a_stop_string_in_the_last_event_is_still_found(tokenizer):
    detok = Detokenizer(tokenizer, stop=["rea"])
    assert detok.add(tokenizer.encode("an area"), final=True) == "an a"
    assert detok.stopped
