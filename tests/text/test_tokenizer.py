"""Byte and Hugging Face tokenizers: round trips, special ids, saving, BPE training, chat
templates (rendered as transformers renders them) and files plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from helpers import (
    ADDS_BOS,
    BOS,
    BOS_CHAT,
    BPE_PROMPTS,
    EOS,
    NEW_TOKENS,
    TOKENIZER_KINDS,
    backend,
    chat_ids,
    hf_greedy,
    model_folder,
    theirs,
    until_eos,
    write_tokenizer,
)
from tokenizers import models
from transformers import AutoTokenizer

import multitoken
from multitoken.cli import main
from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import byte_level_backend, write_hf_tokenizer
from multitoken.text.chat import ChatTemplateError
from multitoken.text.prompts import Prompt
from multitoken.text.tokenizer import (
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
    with pytest.raises(MultitokenError, match="vocabulary size 100 is too small") as err:
        train_bpe(CORPUS, 100, tmp_path / "t.json")
    assert err.value.flag == "--vocab-size"
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


def test_post_processor_specials_only_around_a_whole_text(tmp_path: Path) -> None:
    tok = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2}, unk_token="</s>"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    wrapped = HFTokenizer(tok)
    assert (wrapped.bos_id, wrapped.eos_id, wrapped.pad_id) == (0, 1, 1)
    assert wrapped.encode("hi hi") == [2, 2]  # a fragment
    assert wrapped.encode("hi hi", add_special_tokens=True) == [0, 2, 2, 1]  # a whole text
    assert (wrapped.added_specials.prefix, wrapped.added_specials.suffix) == ((0,), (1,))
    # The byte tokenizer adds nothing: from-scratch trunks were always trained that way.
    assert ByteTokenizer().encode("hi", add_special_tokens=True) == ByteTokenizer().encode("hi")


@pytest.mark.parametrize("content", [None, "{not json", '{"model": 1}'])
def test_bad_tokenizer_paths(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MultitokenError) as info:
        load_tokenizer(str(path))
    assert info.value.flag == "--tokenizer"
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(MultitokenError, match="has no tokenizer") as info:
        load_tokenizer(str(tmp_path))
    assert info.value.flag == "--tokenizer"


def test_tokenizer_without_eos_is_rejected(tmp_path: Path) -> None:
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MultitokenError, match="no end-of-text token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# Chat templates

# Uses what real templates use: bos_token/eos_token, a namespace, loop variables and controls,
# raise_exception, tojson, whitespace control, trim_blocks/lstrip_blocks-sensitive layout.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='', shown=false) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = m['content'] %}
        {% continue %}
    {% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
<|{{ m['role'] }}|>{% if ns.system and not ns.shown %}[{{ ns.system | trim }}] {% set ns.shown = true %}{% endif %}
{{ m['content'] }}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""
CHAT = [
    {"role": "system", "content": "  be brief  "},
    {"role": "user", "content": "Grüße, <b>world</b> 😀", "meta": {"k": "é<&>"}, "x": None},
    {"role": "assistant", "content": "hi\n  there"},
    {"role": "user", "content": "again"},
]
SIMPLE_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def _hf_folder(bpe: HFTokenizer, folder: Path, config: dict) -> Path:
    """A transformers-style model folder: tokenizer.json plus a tokenizer_config.json."""
    bpe.save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_bos", [False, True])
def test_chat_template_renders_as_transformers_does(
    bpe: HFTokenizer, tmp_path: Path, add_generation_prompt: bool, with_bos: bool
) -> None:
    config = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "chat_template": RICH_TEMPLATE}
    if with_bos:
        config["bos_token"] = "<|endoftext|>"
    folder = _hf_folder(bpe, tmp_path, config)
    ours = load_tokenizer(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    want = theirs.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert got == want
    # Pin the layout too, so a renderer that only agrees with transformers by accident fails:
    # no bos_token renders as nothing; block tags eat their line's newline, {{ }} does not.
    bos = "<|endoftext|>" if with_bos else ""
    assert got == (
        f'{bos}\n<|user|>[be brief] Grüße, <b>world</b> 😀 {{"k": "é<&>"}}<|endoftext|>\n'
        "<|assistant|>hi\n  there<|endoftext|>\n<|user|>again<|endoftext|>\n"
        + "<|assistant|>\n"
        * add_generation_prompt
    )


def test_chat_template_errors_are_one_line(bpe: HFTokenizer, tmp_path: Path) -> None:
    tok = HFTokenizer(bpe.backend, eos="<|endoftext|>", chat_template=RICH_TEMPLATE, source="T")
    with pytest.raises(
        ChatTemplateError, match="^the chat template of T failed: unknown role tool"
    ) as info:
        tok.apply_chat_template([{"role": "tool", "content": "x"}], add_generation_prompt=False)
    assert "\n" not in str(info.value) and info.value.flag == "--tokenizer"
    broken = HFTokenizer(bpe.backend, chat_template="{% for m in messages %}\n{{ m", source="T")
    with pytest.raises(ChatTemplateError, match="does not parse") as info:
        broken.apply_chat_template(CHAT, add_generation_prompt=False)
    assert "\n" not in str(info.value)
    # The sandbox stays shut: no reaching Python internals from a template.
    escape = HFTokenizer(bpe.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        escape.apply_chat_template(CHAT, add_generation_prompt=False)


def test_no_chat_template_is_a_one_line_error(bpe: HFTokenizer, tmp_path: Path) -> None:
    with pytest.raises(MultitokenError, match="the byte tokenizer has no chat template"):
        ByteTokenizer().apply_chat_template(CHAT, add_generation_prompt=True)
    assert ByteTokenizer().chat_template is None
    folder = _hf_folder(bpe, tmp_path, {"eos_token": "<|endoftext|>"})
    plain = load_tokenizer(str(folder))
    assert plain.chat_template is None
    with pytest.raises(MultitokenError, match="tokenizer.json has no chat template") as info:
        plain.apply_chat_template(CHAT, add_generation_prompt=True)
    assert info.value.flag == "--tokenizer"


def test_chat_template_sources_and_checkpoint_round_trip(bpe: HFTokenizer, tmp_path: Path) -> None:
    # chat_template.jinja (what transformers writes now) wins over the config entry.
    folder = _hf_folder(bpe, tmp_path / "a", {"chat_template": "old"})
    (folder / "chat_template.jinja").write_text(SIMPLE_TEMPLATE)
    tok = load_tokenizer(str(folder))
    assert tok.chat_template == SIMPLE_TEMPLATE
    # A list of named templates: transformers uses "default".
    named = [
        {"name": "tool_use", "template": "x"},
        {"name": "default", "template": SIMPLE_TEMPLATE},
    ]
    assert (
        load_tokenizer(str(_hf_folder(bpe, tmp_path / "b", {"chat_template": named}))).chat_template
        == SIMPLE_TEMPLATE
    )
    # A checkpoint keeps the template: save() + tokenizer_from_saved() with a JSON-ed spec.
    spec = json.loads(json.dumps(tok.save(tmp_path / "ckpt")))
    again = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert again.chat_template == SIMPLE_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert again.apply_chat_template(msgs, add_generation_prompt=False) == "<user>hi<assistant>yo"


def test_folder_tokenizer_through_transformers(bpe: HFTokenizer, tmp_path: Path) -> None:
    """No tokenizer.json, only vocab.json + merges.txt: AutoTokenizer builds it, we use its backend."""
    bpe.backend.model.save(str(tmp_path))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "chat_template": SIMPLE_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and not (tmp_path / "tokenizer.json").exists()
    assert tok.encode(TEXT) == bpe.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert tok.chat_template == SIMPLE_TEMPLATE


def test_model_folder_without_any_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MultitokenError) as info:
        load_tokenizer(str(tmp_path))
    message = str(info.value)
    assert info.value.flag == "--tokenizer" and "has no tokenizer" in message
    assert "pass --tokenizer" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Files that plain transformers loads

EXPORT_TEXTS = [
    "",
    " ",
    "plain ascii",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\n\ttabbed\n",
    "ünïcödé, 数字, Ελληνικά, עברית",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
    "specials typed as text: <bos> <eos> <pad> <|endoftext|>",
    "bytes\x00\x01\x7f end",
]


def test_byte_tokenizer_written_for_transformers(tmp_path: Path) -> None:
    byte = ByteTokenizer()
    write_hf_tokenizer(byte, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (256, 257, 258)
    assert len(theirs) == byte.vocab_size
    ours = load_tokenizer(str(tmp_path))
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == byte.vocab_size
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (256, 257, 258)
    for text in EXPORT_TEXTS:
        ids = byte.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids + [257], skip_special_tokens=True) == text
        assert ours.encode(text) == ids and ours.decode(ids) == text
    # Every single byte, including ones that are not valid UTF-8 alone, maps to its own id.
    assert theirs.convert_tokens_to_ids(byte_level_backend().encode("A\n").tokens) == [65, 10]
    assert theirs.decode([0xF0, 0x9F, 0x98, 0x80]) == "😀"
    # ... and survives a checkpoint like any HF tokenizer.
    again = tokenizer_from_saved(tmp_path / "c", json.loads(json.dumps(ours.save(tmp_path / "c"))))
    assert again.encode(EXPORT_TEXTS[7]) == byte.encode(EXPORT_TEXTS[7])


def test_hf_tokenizer_written_for_transformers(bpe: HFTokenizer, tmp_path: Path) -> None:
    tok = HFTokenizer(
        bpe.backend,
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<pad>",
        chat_template=RICH_TEMPLATE,
        source="bpe",
    )
    write_hf_tokenizer(tok, tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    for text in [*EXPORT_TEXTS, TEXT, CORPUS[5]]:
        ids = tok.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    rendered = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert load_tokenizer(str(tmp_path)).chat_template == RICH_TEMPLATE


# ---------------------------------------------------------------------------------------------
# What goes around a whole text (a BOS for Llama-style tokenizers) is the tokenizer's own rule:
# a prompt gets it, a rendered chat gets nothing added (its template spells its BOS), a saved or
# exported tokenizer keeps it, and decoding a plain folder starts as transformers does.


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_encoding_agrees_with_transformers(tmp_path: Path, kind: str) -> None:
    write_tokenizer(tmp_path, kind)
    ours, hf = load_tokenizer(str(tmp_path)), theirs(tmp_path)
    # The folders really differ: two add a BOS, two add nothing.
    assert ours.added_specials.prefix == ((BOS,) if kind in ADDS_BOS else ())
    for prompt in BPE_PROMPTS:
        assert ours.encode(prompt, add_special_tokens=True) == hf(prompt)["input_ids"]
        assert ours.encode(prompt) == hf(prompt, add_special_tokens=False)["input_ids"]
    # A rendered chat spells its BOS itself: encoding it adds no second one.
    ids = Prompt(messages=BOS_CHAT).encode(ours)
    assert ids == chat_ids(hf)
    assert ids[0] == BOS and ids.count(BOS) == 1


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", "Qwen2Tokenizer", "GPT2Tokenizer"])
def test_a_model_familys_tokenizer_class_keeps_the_files_rule(
    tmp_path: Path, tokenizer_class: str
) -> None:
    """transformers builds these classes in code of their own, yet takes the post-processor
    from tokenizer.json, as we do."""
    write_tokenizer(tmp_path, "template-bos", tokenizer_class)
    ours, hf = load_tokenizer(str(tmp_path)), theirs(tmp_path)
    assert ours.added_specials.prefix == (BOS,)
    for prompt in BPE_PROMPTS:
        assert ours.encode(prompt, add_special_tokens=True) == hf(prompt)["input_ids"]


def test_the_rule_is_saved_and_old_specs_add_nothing(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "folder", "template-bos")
    tok = load_tokenizer(str(tmp_path / "folder"))
    spec = json.loads(json.dumps(tok.save(tmp_path / "ckpt")))
    assert spec["added_specials"] == {"prefix": ["<s>"], "suffix": []}
    again = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert again.added_specials == tok.added_specials
    assert again.encode(BPE_PROMPTS[0], add_special_tokens=True) == tok.encode(
        BPE_PROMPTS[0], add_special_tokens=True
    )
    # A checkpoint saved before the rule existed was trained and prompted with nothing added.
    del spec["added_specials"]
    old = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert old.added_specials.prefix == ()
    assert old.encode(BPE_PROMPTS[0], add_special_tokens=True) == tok.encode(BPE_PROMPTS[0])
    # Exported, it still encodes that way in plain transformers.
    write_hf_tokenizer(old, tmp_path / "export")
    hf = theirs(tmp_path / "export")
    assert hf(BPE_PROMPTS[0])["input_ids"] == old.encode(BPE_PROMPTS[0], add_special_tokens=True)


def test_a_saved_rule_overrides_the_post_processor(tmp_path: Path) -> None:
    """A spec naming a prefix gets it even from a tokenizer.json without one, and the export
    tells transformers."""
    tok = HFTokenizer(backend(bos=False), added_specials={"prefix": ["<s>"], "suffix": ["</s>"]})
    assert tok.added_specials.prefix == (BOS,) and tok.added_specials.suffix == (EOS,)
    plain = tok.encode(BPE_PROMPTS[1])
    assert tok.encode(BPE_PROMPTS[1], add_special_tokens=True) == [BOS, *plain, EOS]
    write_hf_tokenizer(tok, tmp_path)
    assert theirs(tmp_path)(BPE_PROMPTS[1])["input_ids"] == [BOS, *plain, EOS]
    with pytest.raises(multitoken.MultitokenError, match="no token '<nope>'"):
        HFTokenizer(backend(bos=False), added_specials={"prefix": ["<nope>"]})


def our_greedy(folder: Path, prompt: str, **options) -> list[int]:
    model = multitoken.load(folder)
    seen: list[int] = []
    model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        speculate=False,
        on_tokens=lambda _row, tokens: seen.extend(tokens),
        **options,
    )
    return until_eos(seen)


CASES = [
    ("llama", "template-bos"),
    ("qwen2", "plain"),
    ("gpt2", "plain"),
    ("qwen2", "vocab-merges-add-bos"),
]


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_plain_folder_decodes_as_transformers(tmp_path: Path, arch: str, kind: str) -> None:
    folder = model_folder(tmp_path, arch, kind)
    hf = theirs(folder)
    for prompt in BPE_PROMPTS[:2]:
        ids = hf(prompt)["input_ids"]
        want = hf_greedy(folder, ids)
        assert want, "the reference stopped at once: the test would prove little"
        assert our_greedy(folder, prompt) == want
        if kind in ADDS_BOS:  # the BOS matters to this trunk, so dropping it would be caught
            assert hf_greedy(folder, ids[1:]) != want
    # A chat rendered by hand is given as such: no second BOS.
    rendered = load_tokenizer(str(folder)).apply_chat_template(BOS_CHAT, add_generation_prompt=True)
    want = hf_greedy(folder, chat_ids(hf))
    assert our_greedy(folder, rendered, add_special_tokens=False) == want


def test_cli_generate_on_a_folder_with_bos(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path, "llama", "template-bos")
    hf = theirs(folder)
    want = hf_greedy(folder, hf(BPE_PROMPTS[0])["input_ids"])
    args = ["generate", "--checkpoint", str(folder), "--prompt", BPE_PROMPTS[0], "--no-speculate"]
    args += ["--precision", "fp32", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == hf.decode(want, skip_special_tokens=True)
