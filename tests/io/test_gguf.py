"""GGUF trunks (multitoken.io.gguf): a ``.gguf`` file loads wherever a model folder does, decodes
exactly as the same weights from a folder, exports to a folder plain transformers loads, carries
heads trained on it by reference, and every damaged input is one line.

The files are written here with the ``gguf`` package from a tiny random Llama, in F32, with a
small byte-level BPE vocabulary and the metadata transformers reads (llama.cpp's key names; q/k
projections permuted as llama.cpp's converter does)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB, micro_llama
from helpers import one_line_error, train_tiny, write_corpus

import multitoken
from multitoken.cli import main
from multitoken.decode.api import generate
from multitoken.errors import MultitokenError
from multitoken.io.checkpoint import load_checkpoint
from multitoken.io.headfile import load_heads, read_heads_meta, trunk_signature
from multitoken.model import MTPModel
from multitoken.text.tokenizer import load_tokenizer
from multitoken.trunk import load_trunk, quiet_transformers

# pad 0, bos 1, eos 2 as in micro_llama, and an end-of-turn 3; spellings no one would guess
SPECIALS = ["<|fill|>", "<|go|>", "<|stop|>", "<|eot|>"]
SYMBOLS = ["Ġ", *"abcdefghijklmnopqrstuvwxyz0123456789():=,.+-"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "Ġ a", "r e", "a t", "e n", "e d"]
MERGES += ["o r", "e s", "Ġ s"]
TOKENS = SPECIALS + SYMBOLS + [m.replace(" ", "") for m in MERGES]
TEMPLATE = "{% for m in messages %}<|go|>{{ m['role'] }}: {{ m['content'] }}<|eot|>{% endfor %}"
TEXT = "the cat sat on a mat, then ate (2+3) dates."
assert len(TOKENS) == VOCAB


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotary halves interleaved), which transformers undoes."""
    pairs = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    model, path: Path, arch: str = "llama", quant: str = "F32", raw: dict | None = None
) -> Path:
    """``model`` as a GGUF file; its matrices stored as ggml type ``quant`` wherever their rows
    are whole blocks of it (the rest, and the norms, F32), as llama.cpp's mixes do. ``raw``:
    parameters stored as given blocks instead (name -> (uint8 blocks, ggml type name), from
    :func:`with_random_blocks`)."""
    raw = raw or {}
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("micro llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    w.add_token_types([control] * len(SPECIALS) + [normal] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)
    w.add_add_bos_token(True)  # Llama-style: a whole text starts with bos
    w.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        a = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            a = _permute(a, c.num_attention_heads)
        elif base.endswith("k_proj"):
            a = _permute(a, c.num_key_value_heads)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        kind = gguf.GGMLQuantizationType[quant]
        if name in raw:
            blocks, stored = raw[name]
            w.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType[stored])
        elif a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0 and quant != "F32":
            quantized = gguf.quants.quantize(np.ascontiguousarray(a), kind)
            w.add_tensor(gguf_name, quantized, raw_dtype=kind)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def with_random_blocks(model, kinds: dict[str, str], seed: int = 0) -> dict:
    """Store the matrices whose names contain a key of ``kinds`` as random blocks of the ggml
    type it maps to (the gguf package dequantises every type but writes only a few: llama.cpp
    writes the K-quants and IQ types), and set the model's weights to those blocks'
    dequantised values, so the model is the float twin of the file. Every byte is below 0x20:
    each f16 scale a block holds is then finite and small. q/k projections are left alone
    (llama.cpp permutes their rows; the quantised types the writer stores test that)."""
    rng = np.random.default_rng(seed)
    raw = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            kind = next((k for part, k in kinds.items() if part in name), None)
            if kind is None or tensor.ndim != 2 or "q_proj" in name or "k_proj" in name:
                continue
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            rows, cols = tensor.shape
            blocks = rng.integers(0, 0x20, (rows, cols // block * size), dtype=np.uint8)
            values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
            tensor.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)))
            raw[name] = (blocks, kind)
    return raw


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random weights as a GGUF file and as a plain transformers folder."""
    root = tmp_path_factory.mktemp("gguf")
    model = micro_llama(5)
    path = write_gguf(model, root / "micro.gguf")
    model.generation_config.eos_token_id = [2, 3]  # the stop tokens the GGUF names
    with quiet_transformers():
        model.save_pretrained(root / "folder")
    return path, root / "folder"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text spelled in the tiny vocabulary only."""
    texts = [" ".join([TEXT] * 30) + f" {i}" for i in range(4)]
    return write_corpus(tmp_path_factory.mktemp("corpus"), texts)


def test_a_gguf_trunk_decodes_as_the_same_weights_from_a_folder(files):
    path, folder = files
    ours, theirs = load_trunk(path), load_trunk(folder)
    assert ours.dtype == torch.float32 and type(ours) is type(theirs)
    # Dense weights with nothing of the quantizer left: it saves and casts like any model.
    assert getattr(ours, "hf_quantizer", None) is None
    assert getattr(ours.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 9, 3, 40, 61, 17], [1, 22, 7, 7, 30, 2, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-6)
    model = multitoken.load(path)  # as generate/bench/distill/export load --checkpoint
    plain = MTPModel(theirs, None).eval()
    prompt = model.tokenizer.encode(TEXT)
    a = generate(model, [prompt], speculate=False, max_new_tokens=16, eos_id=None)
    b = generate(plain, [prompt], speculate=False, max_new_tokens=16, eos_id=None)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 16


# every type the gguf package's writer can store (it reads and dequantises more: the K-quants
# and IQ types, which only llama.cpp writes); Q5_0 is what llama.cpp's Q4_K_M uses for rows
# that are not whole 256-blocks, and transformers' own header reader refused it
QUANTS = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


@pytest.mark.parametrize("quant", QUANTS)
def test_every_tensor_type_loads_as_its_own_rounding_of_the_weights(quant, tmp_path):
    """The file's logits are those of the float model with each stored matrix rounded as the
    type rounds it (quantised and dequantised by the gguf package): exact but for fp32 sums."""
    model = micro_llama(5)
    path = write_gguf(model, tmp_path / f"micro-{quant}.gguf", quant=quant)
    kind = gguf.GGMLQuantizationType[quant]
    rounded = micro_llama(5)
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            a = tensor.numpy()
            if a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
                back = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind)
                tensor.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32)))
    trunk = load_trunk(path)
    ids = torch.tensor([[1, 5, 9, 3, 40, 61, 17], [1, 22, 7, 7, 30, 2, 12]])
    with torch.no_grad():
        ours, theirs = trunk.float()(ids).logits, rounded(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs, model(ids).logits, atol=1e-6)  # the rounding is real


# the types only llama.cpp writes; each row of 256 values is whole blocks of every one of them
BLOCK_TYPES = [
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"),
    *("TQ1_0", "TQ2_0", "MXFP4"),
]


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_k_quants_and_iq_types_load_as_the_gguf_package_dequantises_them(kind, tmp_path):
    model = micro_llama(5, hidden=256)
    raw = with_random_blocks(model, {"proj": kind, "embed": kind, "lm_head": kind})
    assert len(raw) == 2 * 5 + 2  # v, o, gate, up, down per layer; the embeddings
    trunk = load_trunk(write_gguf(model, tmp_path / f"micro-{kind}.gguf", raw=raw))
    ids = torch.tensor([[1, 5, 9, 3, 40, 61, 17], [1, 22, 7, 7, 30, 2, 12]])
    with torch.no_grad():
        torch.testing.assert_close(trunk(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_q4_k_m_mix_with_q5_0_rows_trains_heads_and_decodes_as_transformers(tmp_path, corpus):
    """llama.cpp's Q4_K_M: Q4_K matrices, Q6_K for some, Q5_0 where a row is not whole 256-blocks
    (the down projection's 320 columns here), Q8_0 and F32 beside them. It loads as its float
    twin, heads train on it, and the default decoding equals transformers' greedy."""
    torch.manual_seed(5)
    model = micro_llama(5, hidden=256)
    config = model.config
    config.intermediate_size = 320
    model = type(model)(config).eval()
    raw = with_random_blocks(
        model, {"down_proj": "Q5_0", "v_proj": "Q6_K", "proj": "Q4_K", "embed": "Q4_K"}
    )
    path = write_gguf(model, tmp_path / "micro-Q4_K_M.gguf", quant="Q8_0", raw=raw)
    assert {"Q4_K", "Q6_K", "Q5_0"} <= {k for _, k in raw.values()}
    result = train_tiny(
        tmp_path / "run", corpus, "deepseek", 2, labels="text", trunk=str(path), freeze_trunk=True
    )
    loaded = multitoken.load(result.checkpoint)
    prompt = loaded.tokenizer.encode(TEXT)
    ours = generate(loaded, [prompt], max_new_tokens=16, eos_id=None).tokens[0]
    with torch.no_grad():
        hf = loaded.trunk.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert ours == hf and len(ours) == 16 and len(set(ours)) > 1, ours


def test_a_tensor_type_no_reader_knows_is_named_not_called_corrupt(files, monkeypatch):
    from transformers.integrations.gguf import reader

    from multitoken.io.gguf import read_gguf

    def refuse(*_args, **_kwargs):
        raise ValueError("99 is not a valid GGMLQuantizationType")

    monkeypatch.setattr(reader.GgufHeader, "from_file", refuse)
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    with pytest.raises(MultitokenError, match="a type the installed gguf package cannot read") as e:
        read_gguf(files[0])
    assert "corrupt" not in str(e.value)


def test_the_gguf_tokenizer_has_the_files_vocabulary_specials_template_and_stops(files):
    from transformers import AutoTokenizer

    path, _ = files
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == VOCAB  # no token transformers invents beyond the embedding
    assert tok.special_tokens() == {"bos": "<|go|>", "eos": "<|stop|>", "pad": "<|fill|>"}
    assert tok.chat_template == TEMPLATE
    auto = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.encode(TEXT) == auto(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.encode(TEXT, add_special_tokens=True) == auto(TEXT)["input_ids"]
    assert tok.encode(TEXT, add_special_tokens=True)[0] == 1  # add_bos_token from the file
    assert tok.decode(tok.encode(TEXT)) == TEXT
    model = multitoken.load(path)
    assert model.stop_ids() == {2, 3}  # eos and the file's end-of-turn token


def test_trunk_only_export_of_a_gguf_loads_in_plain_transformers(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = files
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(path), "--trunk-only", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3, 40, 61, 17]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, load_trunk(path)(ids).logits)
    auto = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(str(path))
    assert auto(TEXT)["input_ids"] == ours.encode(TEXT, add_special_tokens=True)
    assert auto.chat_template == TEMPLATE
    assert plain.generation_config.eos_token_id == [2, 3]


def test_heads_on_a_frozen_gguf_trunk_refer_to_it_and_reload(
    files, corpus, tmp_path, capsys, caplog
):
    path, folder = files
    run = tmp_path / "run"
    result = train_tiny(
        run,
        corpus,
        family="deepseek",
        depth=1,
        trunk=str(path),
        freeze_trunk=True,
        eval_every=2,
        save_every=2,
        val_fraction=0.25,
    )
    ckpt = result.checkpoint
    assert not (ckpt / "trunk").exists()  # referred to, not copied
    assert json.loads((ckpt / "multitoken.json").read_text())["trunk_ref"] == str(path.resolve())
    trunk = load_trunk(path)
    signature = read_heads_meta(ckpt)["trunk"]
    assert signature == trunk_signature(trunk)  # the same signature any trunk records
    assert signature["weights_from"] == "micro.gguf (GGUF llama, F32)"
    model, _tok, _meta = load_checkpoint(run)  # the trunk is found through the reference
    assert model.family == "deepseek" and model.trunk.dtype == torch.float32
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multitoken"):
        load_heads(load_trunk(folder), ckpt)  # the same weights from a folder: silent
        assert not caplog.records
        load_heads(micro_llama(6), ckpt)  # other weights: the warning names where each came from
    assert len(caplog.records) == 1
    assert "(micro.gguf (GGUF llama, F32) vs a model folder here)" in caplog.records[0].getMessage()

    # generate --checkpoint X.gguf --heads RUN: speculative decoding gives the trunk's own text.
    common = ["--prompt", "the cat", "--max-new-tokens", "12", "--precision", "fp32", "--json"]
    args = ["generate", "--checkpoint", str(path), "--heads", str(run), *common]
    capsys.readouterr()
    assert main([*args, "--draft-len", "1"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main([*args, "--no-speculate"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == fast["text"]
    assert fast["stats"]["trunk_passes"] <= fast["stats"]["tokens"]

    moved = tmp_path / "elsewhere.gguf"
    shutil.move(path, moved)
    try:
        with pytest.raises(MultitokenError, match="which is gone"):
            load_checkpoint(run)
    finally:
        shutil.move(moved, path)


@pytest.fixture
def damaged(files, tmp_path):
    """GGUF files transformers cannot load, by kind."""
    path, _ = files
    data = path.read_bytes()
    made = {}
    made["architecture"] = write_gguf(micro_llama(0), tmp_path / "rwkv.gguf", arch="rwkv6")
    for name, cut in (("header cut", 300), ("data cut", len(data) - 64)):
        made[name] = tmp_path / f"{name.replace(' ', '-')}.gguf"
        made[name].write_bytes(data[:cut])
    made["not gguf"] = tmp_path / "text.gguf"
    made["not gguf"].write_text("this is not a model\n")
    made["missing"] = tmp_path / "nowhere.gguf"
    return made


@pytest.mark.parametrize(
    "kind, says",
    [
        ("architecture", "cannot load .*rwkv.gguf, a GGUF of architecture 'rwkv6'"),
        ("header cut", "truncated or corrupt"),
        ("data cut", "truncated: its tensors need"),
        ("not gguf", "is not a GGUF file"),
        ("missing", "no such GGUF file"),
    ],
)
def test_a_bad_gguf_is_one_line_and_nothing_is_written(damaged, kind, says, tmp_path, capsys):
    bad = damaged[kind]
    with pytest.raises(MultitokenError, match=says):
        multitoken.load(bad)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "the cat"]) == 2
    assert re.search(says, one_line_error(capsys, "--checkpoint"))
    assert main(["train", "--trunk", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert re.search(says, one_line_error(capsys, "--trunk"))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", "--checkpoint", str(bad), "--trunk-only", "--out", str(tmp_path / "x")])
    one_line_error(capsys, "--checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_without_the_gguf_package_a_gguf_is_refused_in_one_line(files, monkeypatch, capsys):
    path, _ = files
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    with pytest.raises(MultitokenError, match=r"needs the gguf package \(pip install gguf\)"):
        load_trunk(path)
    with pytest.raises(MultitokenError, match="needs the gguf package"):
        load_tokenizer(str(path))
    assert main(["generate", "--checkpoint", str(path), "--prompt", "the cat"]) == 2
    assert "pip install gguf" in one_line_error(capsys, "--checkpoint")
