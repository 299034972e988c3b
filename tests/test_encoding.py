"""Texts are encoded as the model's own tokenizer encodes them: a prompt or a training document
gets what the tokenizer puts around a whole text (a BOS for Llama-style tokenizers), a rendered
chat gets nothing added (its template spells its BOS), and a saved or exported tokenizer keeps
the rule. The reference is always transformers itself: ``AutoTokenizer(folder)(prompt)`` and
greedy ``AutoModelForCausalLM.generate`` on it, for Llama, Qwen2 and GPT-2 trunks."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

import multitoken
from multitoken.bench import read_prompt_file
from multitoken.cli import main
from multitoken.config import GenerateConfig
from multitoken.distill import distill
from multitoken.packing import PackedStream
from multitoken.prompts import Prompt
from multitoken.tokenizer import HFTokenizer, load_tokenizer, tokenizer_from_saved
from multitoken.tokenizer_export import write_hf_tokenizer

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2
CORPUS = [
    f"def area_{i}(width, height):\n    return width * height + {i}  # the quick brown fox\n"
    for i in range(80)
]
PROMPTS = ["def area(width, height):", "the quick brown", " leading space and\nnewline"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [{"role": "user", "content": "what is the area"}]
NEW_TOKENS = 8

# How a folder's tokenizer says what goes around a text:
#   template-bos          tokenizer.json's TemplateProcessing adds <s> (Llama 3, SmolLM style)
#   plain                 nothing anywhere (GPT-2, Qwen2 style)
#   config-add-bos        a plain tokenizer.json, add_bos_token in tokenizer_config.json (which
#                         transformers 5 ignores beside a tokenizer.json)
#   vocab-merges-add-bos  no tokenizer.json: vocab.json + merges.txt, add_bos_token honoured
KINDS = ["template-bos", "plain", "config-add-bos", "vocab-merges-add-bos"]
ADDS_BOS = {"template-bos", "vocab-merges-add-bos"}


@functools.cache
def _trained_backend() -> str:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def backend(bos: bool) -> tokenizers.Tokenizer:
    """A small byte-level BPE; ``bos``: its post-processor adds <s> before a whole text."""
    tok = tokenizers.Tokenizer.from_str(_trained_backend())
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    return tok


def write_tokenizer(
    folder: Path, kind: str, tokenizer_class: str = "PreTrainedTokenizerFast"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": TEMPLATE,
    }
    if kind == "vocab-merges-add-bos":
        backend(bos=False).model.save(str(folder))
        config.update(tokenizer_class="GPT2Tokenizer", add_bos_token=True)
    else:
        backend(bos=kind == "template-bos").save(str(folder / "tokenizer.json"))
        if kind == "config-add-bos":
            config["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def theirs(folder: Path):
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def chat_ids(tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """transformers' ``apply_chat_template(tokenize=True)`` ids of ``CHAT``."""
    out = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


# ---------------------------------------------------------------------------------------------
# The tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_agrees_with_transformers(tmp_path: Path, kind: str) -> None:
    write_tokenizer(tmp_path, kind)
    ours, hf = load_tokenizer(str(tmp_path)), theirs(tmp_path)
    # The folders really differ: two add a BOS, two add nothing.
    assert ours.added_specials.prefix == ((BOS,) if kind in ADDS_BOS else ())
    for prompt in PROMPTS:
        assert ours.encode(prompt, add_special_tokens=True) == hf(prompt)["input_ids"]
        assert ours.encode(prompt) == hf(prompt, add_special_tokens=False)["input_ids"]
    # A rendered chat spells its BOS itself: encoding it adds no second one.
    ids = Prompt(messages=CHAT).encode(ours)
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
    for prompt in PROMPTS:
        assert ours.encode(prompt, add_special_tokens=True) == hf(prompt)["input_ids"]


def test_the_rule_is_saved_and_old_specs_add_nothing(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "folder", "template-bos")
    tok = load_tokenizer(str(tmp_path / "folder"))
    spec = json.loads(json.dumps(tok.save(tmp_path / "ckpt")))
    assert spec["added_specials"] == {"prefix": ["<s>"], "suffix": []}
    again = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert again.added_specials == tok.added_specials
    assert again.encode(PROMPTS[0], add_special_tokens=True) == tok.encode(
        PROMPTS[0], add_special_tokens=True
    )
    # A checkpoint saved before the rule existed was trained and prompted with nothing added.
    del spec["added_specials"]
    old = tokenizer_from_saved(tmp_path / "ckpt", spec)
    assert old.added_specials.prefix == ()
    assert old.encode(PROMPTS[0], add_special_tokens=True) == tok.encode(PROMPTS[0])
    # Exported, it still encodes that way in plain transformers.
    write_hf_tokenizer(old, tmp_path / "export")
    hf = theirs(tmp_path / "export")
    assert hf(PROMPTS[0])["input_ids"] == old.encode(PROMPTS[0], add_special_tokens=True)


def test_a_saved_rule_overrides_the_post_processor(tmp_path: Path) -> None:
    """A spec naming a prefix gets it even from a tokenizer.json without one, and the export
    tells transformers."""
    tok = HFTokenizer(backend(bos=False), added_specials={"prefix": ["<s>"], "suffix": ["</s>"]})
    assert tok.added_specials.prefix == (BOS,) and tok.added_specials.suffix == (EOS,)
    plain = tok.encode(PROMPTS[1])
    assert tok.encode(PROMPTS[1], add_special_tokens=True) == [BOS, *plain, EOS]
    write_hf_tokenizer(tok, tmp_path)
    assert theirs(tmp_path)(PROMPTS[1])["input_ids"] == [BOS, *plain, EOS]
    with pytest.raises(multitoken.MultitokenError, match="no token '<nope>'"):
        HFTokenizer(backend(bos=False), added_specials={"prefix": ["<nope>"]})


# ---------------------------------------------------------------------------------------------
# Decoding a plain model folder equals transformers' greedy generate on tokenizer(prompt)


def build_model(arch: str, vocab: int):
    torch.manual_seed(0)
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids
        )
    else:
        kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
        config = kind(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **ids,
        )
    # A larger spread than the default makes the random trunk's choices depend on its whole
    # input, so a missing or doubled BOS changes what it writes.
    config.initializer_range = 0.5
    return AutoModelForCausalLM.from_config(config).eval()


def model_folder(root: Path, arch: str, kind: str) -> Path:
    folder = root / f"{arch}-{kind}"
    write_tokenizer(folder, kind)
    model = build_model(arch, load_tokenizer(str(folder)).vocab_size)
    model.save_pretrained(folder)
    return folder


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


def hf_greedy(folder: Path, ids: list[int]) -> list[int]:
    """transformers' greedy continuation of ``ids``, the reference."""
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD,
        )
    return until_eos(out[0, len(ids) :].tolist())


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
    for prompt in PROMPTS[:2]:
        ids = hf(prompt)["input_ids"]
        want = hf_greedy(folder, ids)
        assert want, "the reference stopped at once: the test would prove little"
        assert our_greedy(folder, prompt) == want
        if kind in ADDS_BOS:  # the BOS matters to this trunk, so dropping it would be caught
            assert hf_greedy(folder, ids[1:]) != want
    # A chat rendered by hand is given as such: no second BOS.
    rendered = load_tokenizer(str(folder)).apply_chat_template(CHAT, add_generation_prompt=True)
    want = hf_greedy(folder, chat_ids(hf))
    assert our_greedy(folder, rendered, add_special_tokens=False) == want


def test_cli_generate_on_a_folder_with_bos(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path, "llama", "template-bos")
    hf = theirs(folder)
    want = hf_greedy(folder, hf(PROMPTS[0])["input_ids"])
    args = ["generate", "--checkpoint", str(folder), "--prompt", PROMPTS[0], "--no-speculate"]
    args += ["--precision", "fp32", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == hf.decode(want, skip_special_tokens=True)


def test_distill_and_bench_prompts_are_encoded_as_transformers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "llama", "template-bos")
    hf = theirs(folder)
    model = multitoken.load(folder)
    out = tmp_path / "distilled.jsonl"
    config = GenerateConfig(max_new_tokens=NEW_TOKENS, speculate=False)
    distill(model, [PROMPTS[1], Prompt(messages=CHAT)], out, config)
    text, chat = [json.loads(line) for line in out.read_text().splitlines()]
    for record, ids in ((text, hf(PROMPTS[1])["input_ids"]), (chat, chat_ids(hf))):
        assert record["completion"] == hf.decode(hf_greedy(folder, ids), skip_special_tokens=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": PROMPTS[1]}) + "\n" + json.dumps({"messages": CHAT}))
    assert read_prompt_file(prompts, model.tokenizer) == [hf(PROMPTS[1])["input_ids"], chat_ids(hf)]


# ---------------------------------------------------------------------------------------------
# Training documents start as prompts do


def unpack(batches: list[torch.Tensor]) -> list[int]:
    rows = [row.tolist() for batch in batches for row in batch]
    return rows[0] + [token for row in rows[1:] for token in row[1:]]


def test_packed_documents_start_with_the_tokenizers_bos(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tok", "template-bos")
    tok = load_tokenizer(str(tmp_path / "tok"))
    hf = theirs(tmp_path / "tok")
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    records = [{"text": CORPUS[0]}, {"messages": CHAT}, {"messages": CHAT, "text": rendered}]
    jsonl = tmp_path / "docs" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    long = tmp_path / "docs" / "b.txt"  # read in several blocks: one BOS, at its start
    long.write_text("".join(CORPUS[:20]))
    chat = chat_ids(hf, add_generation_prompt=False)
    want = [
        *hf(CORPUS[0])["input_ids"], EOS,
        *chat, EOS,  # a chat and a distilled chat: the template's BOS only
        *chat, EOS,
        *hf("".join(CORPUS[:20]))["input_ids"], EOS,
    ]  # fmt: skip
    assert want[0] == BOS and chat.count(BOS) == 1
    stream = PackedStream([jsonl, long], tok, 16, 1, loop=False, shuffle=False, block_bytes=256)
    got = unpack(list(stream))
    assert got == want[: len(got)] and len(want) - len(got) < 16
    assert got.count(BOS) == 4
