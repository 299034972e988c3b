"""Self-distillation from a plain transformers model folder: chat prompts rendered with the
folder's chat template, completions equal to the trunk's greedy decoding, records that train
directly, resumption, and bad input refused before anything is decoded or written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import micro_llama
from helpers import one_line_error

import multitoken
from multitoken.cli import main
from multitoken.text.tokenizer import train_bpe

VOCAB = 320  # micro Llama vocabulary; the BPE below has at most this many tokens
NEW_TOKENS = 6
# A template with visible markers, so the rendered text can be checked by hand.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "say hello"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is two plus two"},
    ],
]
TEXT_PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain transformers folder: random micro Llama, a small BPE, a chat template."""
    root = tmp_path_factory.mktemp("plain")
    corpus = [f"<|user|>say hello {i}<|end|> def add(a, b): return a + {i}\n" for i in range(60)]
    bpe = train_bpe(corpus, VOCAB, root / "tokenizer.json")
    assert bpe.vocab_size <= VOCAB
    model = micro_llama(vocab=VOCAB)
    model.generation_config.eos_token_id = bpe.eos_id  # the model stops where its tokenizer does
    model.save_pretrained(root)
    config = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "chat_template": TEMPLATE}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"messages": CHATS[0]}, {"text": TEXT_PROMPT}, {"messages": CHATS[1]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def greedy_completion(
    folder: Path, prompt: str, eos_id: int | None = None, chat: bool = False
) -> tuple[str, list]:
    """transformers' own greedy generate on the encoded prompt: the reference decoding. A
    rendered ``chat`` is encoded as it is, plain text as a whole text (as transformers does)."""
    model = multitoken.load(folder)
    ids = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=not chat)])
    eos = model.tokenizer.eos_id if eos_id is None else eos_id
    with torch.no_grad():
        out = model.trunk.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=model.tokenizer.pad_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return model.tokenizer.decode(new), new


def distill_args(folder: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--trunk",
        str(folder),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_distill_chat_prompts_from_a_plain_folder_and_resume(
    folder: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sub" / "d.jsonl"
    assert main(distill_args(folder, prompts_file, out)) == 0
    records = read_records(out)
    assert len(records) == 3

    for record, chat in zip((records[0], records[2]), CHATS):
        # The prompt is the chat rendered with a generation prompt (written out by hand here).
        rendered = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in chat)
        assert record["prompt"] == rendered + "<|assistant|>"
        want, ids = greedy_completion(folder, record["prompt"], chat=True)
        assert ids, "the reference decoded nothing: the test would prove little"
        assert record["completion"] == want
        # The answer is a new turn, and the whole chat is rendered with the template's markers.
        assert record["messages"] == [*chat, {"role": "assistant", "content": want}]
        assert record["text"] == f"{rendered}<|assistant|>{want}<|end|>\n"

    # Text prompts are continued as before.
    want, _ = greedy_completion(folder, TEXT_PROMPT)
    assert records[1] == {
        "text": TEXT_PROMPT + want,
        "prompt": TEXT_PROMPT,
        "completion": want,
    }

    # Resume: a run cut in the middle of line 2 redoes only what is missing.
    data = out.read_bytes()
    first_end = data.index(b"\n") + 1
    out.write_bytes(data[: first_end + 10])
    capsys.readouterr()
    assert main(distill_args(folder, prompts_file, out)) == 0
    assert "2 new lines (3 prompts in all)" in capsys.readouterr().out
    assert read_records(out) == records
    assert main(distill_args(folder, prompts_file, out)) == 0
    assert "0 new lines" in capsys.readouterr().out
    assert read_records(out) == records


STOP_PROMPT = "<|user|>say hello<|end|> <|assistant|>"  # one line: a text prompt


def unstopped_greedy(folder: Path) -> tuple[list[int], int]:
    """The trunk's greedy tokens after STOP_PROMPT with no stop token, and the first position
    k > 0 whose token is new: made a stop token, the completion is exactly ids[:k]."""
    _, ids = greedy_completion(folder, STOP_PROMPT, eos_id=VOCAB + 1)  # never drawn: no stop
    assert len(ids) == NEW_TOKENS
    cut = next((k for k in range(1, len(ids)) if ids[k] not in ids[:k]), None)
    assert cut is not None, "the random trunk repeats one token; pick another seed"
    return ids, cut


def distill_stop_prompt(variant: Path, tmp_path: Path) -> dict:
    """Distil STOP_PROMPT with the model folder ``variant``; its one record."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(STOP_PROMPT + "\n")
    out = tmp_path / "d.jsonl"
    assert main(distill_args(variant, prompts, out)) == 0
    (record,) = read_records(out)
    return record


def test_distill_stops_at_eos(folder: Path, tmp_path: Path) -> None:
    """With the trunk's third greedy token made the eos, the completion is the first two."""
    ids, cut = unstopped_greedy(folder)
    eos_folder = tmp_path / "eos"
    shutil.copytree(folder, eos_folder)
    tok = multitoken.load(folder).tokenizer
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = tok.backend.id_to_token(ids[cut])
    (eos_folder / "tokenizer_config.json").write_text(json.dumps(config))
    record = distill_stop_prompt(eos_folder, tmp_path)
    want, _ = greedy_completion(eos_folder, STOP_PROMPT)
    assert record["completion"] == want
    assert record["completion"] == tok.decode(ids[:cut])


def test_distill_stops_at_a_chat_models_end_of_turn_token(folder: Path, tmp_path: Path) -> None:
    """A chat model ends its turn with a token of its own, named beside eos in its generation
    config (as Qwen's <|im_end|> is): the completion stops there too."""
    ids, cut = unstopped_greedy(folder)
    turn_folder = tmp_path / "turn"
    shutil.copytree(folder, turn_folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    tok = multitoken.load(folder).tokenizer
    generation["eos_token_id"] = [tok.eos_id, ids[cut]]
    (turn_folder / "generation_config.json").write_text(json.dumps(generation))
    record = distill_stop_prompt(turn_folder, tmp_path)
    assert record["completion"] == tok.decode(ids[:cut])


@pytest.fixture(scope="module")
def no_template_folder(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notemplate") / "model"
    shutil.copytree(folder, root)
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return root


@pytest.fixture(scope="module")
def not_causal_folder(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tokenizer but a config no causal LM class takes."""
    root = tmp_path_factory.mktemp("t5") / "model"
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, root / name)
    (root / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    return root


# A good prompt comes first in each file: refusing only when reaching the bad one would already
# have decoded and written the good one.
FINE = '{"text": "fine"}\n'
BAD_INPUT = {
    "prompt line without text or messages": (
        FINE + '{"prompt": "x"}\n',
        "folder",
        "--prompts",
        "prompts.jsonl:2: not JSON with a",
    ),
    "malformed messages": (
        FINE + '{"messages": [{"content": "no role"}]}\n',
        "folder",
        "--prompts",
        "prompts.jsonl:2:",
    ),
    "messages but no chat template": (
        FINE + '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "no_template_folder",
        "--prompts",
        "tokenizer.json has no chat template",
    ),
    "a folder that is not a causal LM": (FINE, "not_causal_folder", "--trunk", "t5"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    content, folder_fixture, flag, detail = BAD_INPUT[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out" / "d.jsonl"
    capsys.readouterr()
    assert main(distill_args(request.getfixturevalue(folder_fixture), prompts, out)) == 2
    assert detail in one_line_error(capsys, flag)  # one line: no traceback
    assert not out.exists() and not out.parent.exists()


def test_out_must_be_jsonl_and_existing_output_is_left_alone(
    folder: Path, no_template_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    capsys.readouterr()
    assert main(distill_args(folder, prompts, tmp_path / "d.txt")) == 2
    assert "must end in .jsonl" in one_line_error(capsys, "--out")
    assert not (tmp_path / "d.txt").exists()
    # An existing output is not extended when the input is refused.
    out = tmp_path / "d.jsonl"
    out.write_text('{"text": "earlier"}\n')
    assert main(distill_args(no_template_folder, prompts, out)) == 2
    assert out.read_text() == '{"text": "earlier"}\n'
    # A plain folder has no training corpus to take prompts from.
    args = ["distill", "--trunk", str(folder), "--out", str(out)]
    assert main(args) == 2
    assert "pass --prompts" in capsys.readouterr().err
