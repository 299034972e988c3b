"""Prompts (multitoken.text.prompts): prompt files read line by line or as JSONL records with every
bad line named by file and line, prompts encoded as the model's tokenizer encodes a whole text
(a rendered chat gets nothing added), and corpus windows that start at lines, differ, and read a
bounded amount of text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    BOS_CHAT,
    BPE_PROMPTS,
    NEW_TOKENS,
    chat_ids,
    hf_greedy,
    model_folder,
    theirs,
)

import multitoken
from multitoken.bench.run import read_prompt_file
from multitoken.config import GenerateConfig
from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import byte_level_backend
from multitoken.text import prompts as prompts_module
from multitoken.text.prompts import Prompt, read_prompt_records, window_prompts
from multitoken.text.tokenizer import ByteTokenizer, HFTokenizer
from multitoken.training.distill import distill

TOK = ByteTokenizer()
CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m.role }}:{{ m.content }}{% endfor %}"
CHAT_TEMPLATE += "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
# Byte ids, a <bos> (256) before a whole text, and a chat template that spells <bos> itself.
BOS_TOK = HFTokenizer(
    byte_level_backend(),
    eos="<eos>",
    added_specials={"prefix": ["<bos>"]},
    chat_template=CHAT_TEMPLATE,
    source="T",
)
HELLO = [{"role": "user", "content": "hello"}]


def write(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def refused(path: Path, says: str) -> None:
    with pytest.raises(MultitokenError, match=says) as err:
        read_prompt_records(path)
    assert err.value.flag == "--prompts" and "\n" not in err.value.message


# --- prompt files -----------------------------------------------------------------------------


def test_a_text_file_holds_one_prompt_per_non_blank_line_named_by_its_line(tmp_path: Path):
    path = write(tmp_path / "p.txt", ["first prompt", "", "   ", "  second, indented "])
    got = read_prompt_records(path)
    assert [p.text for p in got] == ["first prompt", "  second, indented "]
    assert [p.where for p in got] == [f"{path}:1", f"{path}:4"]
    assert not any(p.is_chat for p in got)


def test_jsonl_records_are_texts_or_chats_kept_as_messages(tmp_path: Path):
    path = write(tmp_path / "p.JSONL", [{"text": "a\nb"}, "", {"messages": HELLO, "id": 7}])
    text, chat = read_prompt_records(path)
    assert text == Prompt(text="a\nb", where=f"{path}:1")
    assert chat.is_chat and chat.messages == HELLO and chat.where == f"{path}:3"


def test_a_text_file_of_json_is_just_text(tmp_path: Path):
    line = json.dumps({"text": "x"})
    assert read_prompt_records(write(tmp_path / "p.txt", [line]))[0].text == line


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps({"text": 3}),
        json.dumps(["a list"]),
        json.dumps({"prompt": "other key"}),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path, bad: str):
    path = write(tmp_path / "p.jsonl", [{"text": "fine"}, bad])
    refused(path, f'^{path}:2: not JSON with a "text" string or a "messages" list$')


def test_a_bad_chat_record_is_named_by_file_and_line(tmp_path: Path):
    path = write(tmp_path / "p.jsonl", [{"messages": []}])
    refused(path, f'^{path}:1: "messages" must be a non-empty list')


def test_a_missing_or_empty_prompts_file_is_refused(tmp_path: Path):
    refused(tmp_path / "nope.txt", "no such file")
    refused(write(tmp_path / "blank.txt", ["", "  "]), "holds no prompt")


# --- encoding ---------------------------------------------------------------------------------


def test_plain_text_gets_the_tokenizers_specials_and_a_chat_none_added():
    assert Prompt(text="hi").encode(BOS_TOK) == [256, *b"hi"]
    assert Prompt(text="hi").encode(TOK) == list(b"hi")
    rendered = Prompt(messages=HELLO).render(BOS_TOK)
    assert rendered == "<bos>user:hello<bos>assistant:"  # with the generation prompt
    ids = Prompt(messages=HELLO).encode(BOS_TOK)
    assert ids == BOS_TOK.encode(rendered) and ids.count(256) == 2  # the template's, no third


def test_an_empty_text_prompt_renders_empty():
    assert Prompt().render(TOK) == "" and not Prompt().is_chat


def test_a_chat_for_a_tokenizer_without_a_template_names_the_prompt_and_the_callers_flag():
    prompt = Prompt(messages=HELLO, where="p.jsonl:3")
    with pytest.raises(MultitokenError, match="^p.jsonl:3: the byte tokenizer has no chat") as err:
        prompt.encode(TOK, flag="--prompt")
    assert err.value.flag == "--prompt"


def test_distill_and_bench_prompts_are_encoded_as_transformers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "llama", "template-bos")
    hf = theirs(folder)
    model = multitoken.load(folder)
    out = tmp_path / "distilled.jsonl"
    config = GenerateConfig(max_new_tokens=NEW_TOKENS, speculate=False)
    distill(model, [BPE_PROMPTS[1], Prompt(messages=BOS_CHAT)], out, config)
    text, chat = [json.loads(line) for line in out.read_text().splitlines()]
    for record, ids in ((text, hf(BPE_PROMPTS[1])["input_ids"]), (chat, chat_ids(hf))):
        assert record["completion"] == hf.decode(hf_greedy(folder, ids), skip_special_tokens=True)
    prompts = write(tmp_path / "prompts.jsonl", [{"text": BPE_PROMPTS[1]}, {"messages": BOS_CHAT}])
    want = [hf(BPE_PROMPTS[1])["input_ids"], chat_ids(hf)]
    assert read_prompt_file(prompts, model.tokenizer) == want


# --- windows of a corpus ----------------------------------------------------------------------


def test_windows_are_exact_fragments_without_specials_and_fewer_when_the_text_runs_out():
    text = "".join(f"line {i:02d} of the corpus\n" for i in range(3))
    got = window_prompts([text], BOS_TOK, 10, 8)
    assert len(got) == 3  # three lines, so three distinct windows at most
    assert all(len(ids) == 8 and 256 not in ids for ids in got)
    assert sorted(BOS_TOK.decode(ids) for ids in got) == [f"line {i:02d} " for i in range(3)]


def test_windows_come_from_every_text_given():
    texts = [f"text {i} has a line long enough\n" for i in range(4)]
    got = {TOK.decode(ids) for ids in window_prompts(texts, TOK, 4, 6)}
    assert got == {f"text {i}" for i in range(4)}


def test_windows_read_no_more_text_than_the_cap(monkeypatch):
    monkeypatch.setattr(prompts_module, "MAX_PROMPT_SOURCE_CHARS", 100)
    read: list[int] = []

    def texts() -> Iterator[str]:
        for i in range(50):
            read.append(i)
            yield f"chunk {i:02d} of sixty characters, more or less, for the cap\n"

    got = window_prompts(texts(), TOK, 20, 8)
    assert len(read) == 2  # the text that crossed the cap is the last one read
    assert {TOK.decode(ids) for ids in got} == {"chunk 00", "chunk 01"}
