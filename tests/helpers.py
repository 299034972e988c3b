"""Builders shared by the test files: tiny corpora, model folders, checkpoints and training runs.

Everything here is deliberately small (litgpt-style micro configs, a few steps of training) so a
test that needs a real run, folder or checkpoint pays seconds, not minutes. ``micro_llama`` and
the distribution helpers stay in ``conftest.py``, which every test module can import.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
from conftest import micro_llama, perturb_heads
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

import multitoken
from multitoken.config import HeadConfig
from multitoken.decode.sampling import accept_greedy_rows, accept_sampled_rows, accept_typical_rows
from multitoken.decode.trees.dynamic import keep_best, path_values
from multitoken.io.checkpoint import save_checkpoint
from multitoken.io.tokenizer_files import byte_level_backend, write_hf_tokenizer
from multitoken.model import MTPModel
from multitoken.text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from multitoken.training.trainer import TrainResult
from multitoken.trunk import quiet_transformers

BYTES = ByteTokenizer.vocab_size  # 259: a micro trunk over the byte tokenizer
CODE_WORDS = ("def", "return", "x", "y", "=", "+", "(", ")", ":")


def write_corpus(folder: Path, texts: list[str], suffix: str = ".txt") -> Path:
    """``folder`` holding one file per text (``f0.txt``, ``f1.txt``, ...); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"f{i}{suffix}").write_text(text)
    return folder


def tiny_corpus(folder: Path, files: int = 5, words: int = 90, seed: int = 0) -> Path:
    """``files`` small Python-like files of ``words`` random code words each (seeded)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(CODE_WORDS) for _ in range(words)) + "\n" for _ in range(files)]
    return write_corpus(folder, texts, suffix=".py")


def trunk_folder(folder: Path, seed: int = 0, vocab: int = BYTES) -> Path:
    """A plain transformers model folder: a random micro Llama with the byte tokenizer's files,
    usable as ``--trunk`` (or ``--checkpoint`` for decoding)."""
    with quiet_transformers():
        micro_llama(seed, vocab=vocab).save_pretrained(folder)
    write_hf_tokenizer(ByteTokenizer(), folder)
    return folder


def saved_run(
    run_dir: Path,
    family: str = "deepseek",
    depth: int = 2,
    trunk_seed: int = 3,
    head_seed: int = 7,
    step: int = 1,
) -> MTPModel:
    """A run folder with one checkpoint at ``step``: a byte-level micro trunk and heads moved off
    their initial values (so a load that dropped them would be seen). Returns the saved model."""
    trunk = micro_llama(trunk_seed, vocab=BYTES)
    model = perturb_heads(MTPModel(trunk, HeadConfig(family=family, depth=depth)), seed=head_seed)
    save_checkpoint(run_dir, step, model, ByteTokenizer(), {})
    return model


def train_tiny(
    out: Path, data: Path, family: str = "bpd", depth: int = 1, **options: Any
) -> TrainResult:
    """``multitoken.train`` on ``data`` into ``out`` with the smallest settings that still save a
    checkpoint: two steps of two rows of 16 tokens on the CPU in fp32. ``options`` override any
    of them or add others (``trunk``, ``freeze_trunk``, ...). The run folder is ``result.out``."""
    values: dict[str, Any] = dict(
        data=[str(data)],
        out=str(out),
        family=family,
        depth=depth,
        seq_len=16,
        batch_size=2,
        max_steps=2,
        eval_batches=1,
        precision="fp32",
        device="cpu",
    )
    values.update(options)
    return multitoken.train(**values)


# Ids are bytes as for ByteTokenizer, but a whole text starts with <bos> (256), as a Llama
# tokenizer's does.
BOS_BYTES = HFTokenizer(byte_level_backend(), eos="<eos>", added_specials={"prefix": ["<bos>"]})


def make_files(folder: Path, count: int = 6) -> list[Path]:
    """Small text files with distinct markers and multi-byte characters."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"doc{i}.txt"
        path.write_text(f"FILE{i} héllo wörld €😀 line {i}\n" * (3 + i), encoding="utf-8")
        files.append(path)
    return files


def expected_tokens(files: list[Path], tok: Tokenizer | None = None) -> list[int]:
    """The stream's definition: each document's ids as a whole text, then eos, in order (bytes
    unless ``tok`` is given)."""
    tok = tok or ByteTokenizer()
    ids: list[int] = []
    for path in files:
        ids += tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=True)
        ids.append(tok.eos_id)
    return ids


def unpack(batches: list[torch.Tensor]) -> list[int]:
    """Undo packing: consecutive rows share one token, so drop each later row's first token."""
    rows = [row.tolist() for batch in batches for row in batch]
    return rows[0] + [token for row in rows[1:] for token in row[1:]] if rows else []


def one_line_error(capsys: pytest.CaptureFixture[str], flag: str | None = None) -> str:
    """The CLI's error output, checked to be one line ``multitoken: error: FLAG: ...`` (any flag
    when ``flag`` is None); returns that line."""
    err = capsys.readouterr().err.strip().splitlines()
    prefix = "multitoken: error: " + (f"{flag}: " if flag else "--")
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


# ---------------------------------------------------------------------------------------------
# Tokenizer and model folders as transformers writes them, differing in what the tokenizer puts
# around a whole text; transformers itself is the reference (``theirs``, ``hf_greedy``).

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2
BPE_CORPUS = [
    f"def area_{i}(width, height):\n    return width * height + {i}  # the quick brown fox\n"
    for i in range(80)
]
BPE_PROMPTS = ["def area(width, height):", "the quick brown", " leading space and\nnewline"]
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOS_CHAT = [{"role": "user", "content": "what is the area"}]
NEW_TOKENS = 8

# How a folder's tokenizer says what goes around a text:
#   template-bos          tokenizer.json's TemplateProcessing adds <s> (Llama 3, SmolLM style)
#   plain                 nothing anywhere (GPT-2, Qwen2 style)
#   config-add-bos        a plain tokenizer.json, add_bos_token in tokenizer_config.json (which
#                         transformers 5 ignores beside a tokenizer.json)
#   vocab-merges-add-bos  no tokenizer.json: vocab.json + merges.txt, add_bos_token honoured
TOKENIZER_KINDS = ["template-bos", "plain", "config-add-bos", "vocab-merges-add-bos"]
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
    tok.train_from_iterator(BPE_CORPUS, trainer=trainer)
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
        "chat_template": BOS_TEMPLATE,
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
    """transformers' ``apply_chat_template(tokenize=True)`` ids of ``BOS_CHAT``."""
    out = tokenizer.apply_chat_template(
        BOS_CHAT, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def build_model(arch: str, vocab: int):
    torch.manual_seed(0)
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids
        )
    else:
        kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
        shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        attention = {"num_attention_heads": 4, "num_key_value_heads": 2}
        config = kind(vocab_size=vocab, max_position_embeddings=256, **shape, **attention, **ids)
        config.tie_word_embeddings = False
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


# One-row and one-call forms of the batched acceptance rules, for tests that state a case by hand


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """drafts [K], target [K+1] -> (m leading drafts equal to the trunk's choice, its token after)."""
    m = int(accept_greedy_rows(drafts[None], target[None])[0])
    return m, int(target[m])


def accept_sampled(drafts, q, p, generator) -> tuple[int, int]:
    """One row of ``accept_sampled_rows``: drafts [K], q [K, V], p [K+1, V] -> (m, next)."""
    m, nxt = accept_sampled_rows(drafts[None], q[None], p[None], generator)
    return int(m[0]), int(nxt[0])


def accept_typical(drafts, p, eps: float, generator) -> tuple[int, int]:
    """One row of ``accept_typical_rows``: drafts [K], p [K+1, V] -> (m, next)."""
    m, nxt = accept_typical_rows(drafts[None], p[None], eps, generator)
    return int(m[0]), int(nxt[0])


def prune_tree(skeleton, scores: torch.Tensor, budget: int):
    """Each row's ``budget`` best nodes of ``skeleton``: (trees, kept [B, budget + 1])."""
    return keep_best(skeleton, path_values(skeleton, scores), budget)
