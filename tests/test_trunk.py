"""The trunk adapter finds what heads need through generic interfaces, for several architectures,
and every family trains on each of them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import multitoken
from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.trunk import inspect_trunk, load_trunk

V = 300
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt-neox": lambda: GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    ),
    # local and global layers with rope bases of their own (the rotary takes the layer kind),
    # a sliding window, QK-norm, scaled embeddings, soft-capped logits
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    ),
}


def build(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()  # eval: no dropout


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_parts_are_found_by_interface(arch):
    model = build(arch)
    parts = inspect_trunk(model)
    assert parts.embed is model.get_input_embeddings()
    assert parts.unembed is model.get_output_embeddings()
    assert len(parts.layers) == 2
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():  # the final norm found by probing really is what lm_head reads
        out = model(ids, output_hidden_states=True)
        logits = parts.unembed(out.hidden_states[-1])
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma: soft-capped after the unembedding
            logits = torch.tanh(logits / cap) * cap
        torch.testing.assert_close(logits, out.logits)
    assert (parts.rotary is None) == (arch == "gpt2")  # GPT-2 has learned absolute positions


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_every_family_trains_on_every_architecture(arch, family):
    model = MTPModel(build(arch), HeadConfig(family=family, depth=2)).eval()
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(tokens, lam=0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.head_losses.shape == (2,)
    head_grads = [p.grad for p in model.heads.parameters() if p.requires_grad]
    assert all(g is not None for g in head_grads) and any(g.abs().sum() > 0 for g in head_grads)
    if family == "meta":  # the head-by-head backward also matches on this architecture
        fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model(tokens, lam=0.5, memory_efficient=False).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_frozen_trunk_stays_in_inference_mode_while_heads_train():
    model = MTPModel(build("gpt2"), HeadConfig(family="meta", depth=1))  # GPT-2 has dropout
    model.trunk.requires_grad_(False)
    model.train()
    assert not model.trunk.training and model.heads.training
    model.trunk.requires_grad_(True)
    assert model.train().trunk.training


def model_folder(model, folder):
    """A plain transformers folder: the model and a tokenizer (bytes: 259 of its 300 ids)."""
    from multitoken.io.tokenizer_files import write_hf_tokenizer
    from multitoken.text.tokenizer import ByteTokenizer

    model.save_pretrained(folder)
    write_hf_tokenizer(ByteTokenizer(), folder)
    return folder


def train_heads_only(folder, tmp_path, **options):
    """Two heads-only steps on a tiny corpus with ``folder`` as the trunk, on the text's labels
    (a random trunk's greedy path seldom follows the text: --labels trunk would leave the heads
    next to nothing to learn)."""
    data = tmp_path / "data.txt"
    data.write_text("hello world, this is a tiny corpus for a tiny model.\n" * 100)
    return multitoken.train(
        **{"family": "deepseek", "depth": 2, "labels": "text", **options},
        trunk=str(folder),
        freeze_trunk=True,
        data=[str(data)],
        out=str(tmp_path / "run"),
        max_steps=2,
        seq_len=16,
        batch_size=2,
        eval_batches=1,
        save_every=2,
    )


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_heads_only_on_a_local_model_folder(tmp_path, arch):
    """--trunk takes a plain transformers folder of each architecture: its tokenizer is used, its
    files and weights stay byte for byte, the checkpoint refers to it instead of copying it."""
    folder = model_folder(build(arch), tmp_path / arch)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    result = train_heads_only(folder, tmp_path)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    trained = result.model.trunk.state_dict()
    on_disk = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert on_disk.keys() == trained.keys()
    for name, saved in on_disk.items():
        assert torch.equal(saved.view(torch.uint8), trained[name].view(torch.uint8)), name
    assert not (result.checkpoint / "trunk").exists()  # referred to, not copied
    loaded = multitoken.load(result.checkpoint)
    assert type(loaded.trunk).__name__ == type(result.model.trunk).__name__
    for name, p in result.model.heads.state_dict().items():
        assert torch.equal(p, loaded.heads.state_dict()[name]), name
    # DeepSeek modules start as the identity on h, not as a copy of the trunk's last layer
    # (the default measured better: benchmarks/deepseek_init.py); meta's would copy it.
    meta = json.loads((result.checkpoint / "multitoken.json").read_text())
    assert meta["heads"]["family"] == "deepseek"
    assert meta["heads"]["init_from_trunk"] is False


def test_a_half_precision_model_folder_trains_fp32_heads_that_load_back_onto_it(tmp_path):
    folder = model_folder(build("llama").to(torch.bfloat16), tmp_path / "bf16")
    result = train_heads_only(folder, tmp_path, family="bpd", lr=1e-2)
    assert all(p.dtype == torch.float32 for p in result.model.heads.parameters())
    assert result.model.heads.w_out.abs().max() > 0  # updates that bf16 weights would round off
    loaded = multitoken.load(folder, heads=result.checkpoint)  # a bf16 trunk, heads cast to it
    assert loaded.trunk.dtype == torch.bfloat16 and loaded.heads.w_in.dtype == torch.bfloat16
    expected = result.model.heads.w_in.to(torch.bfloat16)
    assert torch.equal(loaded.heads.w_in, expected)


def test_a_damaged_model_folder_is_one_line_naming_it(tmp_path):
    folder = model_folder(build("llama"), tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MultitokenError, match=f"^cannot load a causal LM from {folder}: ") as err:
        load_trunk(folder, "--checkpoint")
    assert err.value.flag == "--checkpoint" and "\n" not in str(err.value)


def test_trunk_labels_on_a_trunk_that_rarely_follows_the_text_say_so(tmp_path, caplog):
    """A random trunk's greedy path seldom follows the text: --labels trunk (the default with
    --freeze-trunk) would leave the heads next to nothing to learn, and the run says so."""
    folder = model_folder(build("llama"), tmp_path / "llama")
    for name in ("trunk", "text"):
        (tmp_path / name).mkdir()
    with caplog.at_level("WARNING", logger="multitoken"):
        train_heads_only(folder, tmp_path / "trunk", labels="trunk")
    said = [r.message for r in caplog.records if "greedy path" in r.message]
    assert len(said) == 1 and "--labels soft" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="multitoken"):
        train_heads_only(folder, tmp_path / "text", labels="text")
    assert not [r for r in caplog.records if "greedy path" in r.message]


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_gemma3_decodes_exactly_past_its_window(family):
    """Gemma-3's sliding and full layers rotate with rope bases of their own and its logits are
    soft-capped: speculation (the default, a chain, a fixed tree) must still give plain
    decoding's tokens, for a batch whose rows pass the 4-position window."""
    from conftest import perturb_heads

    from multitoken.decode.api import generate

    model = perturb_heads(MTPModel(build("gemma3"), HeadConfig(family=family, depth=2)), 0, 0.3)
    prompts = [list(range(5, 17)), [7, 8, 9]]
    plain = generate(model, prompts, max_new_tokens=20, speculate=False)
    for options in ({}, {"tree": "chain", "draft_len": 2}, {"tree": "2,1"}):
        assert generate(model, prompts, max_new_tokens=20, **options).tokens == plain.tokens
    with torch.no_grad():  # and plain decoding is transformers' own greedy decoding
        ours = generate(model, [prompts[0]], max_new_tokens=20, speculate=False).tokens[0]
        hf = model.trunk.generate(
            torch.tensor([prompts[0]]), max_new_tokens=20, do_sample=False, pad_token_id=0
        )
    theirs = hf[0, len(prompts[0]) :].tolist()  # transformers stops at an EOS; we do not
    assert theirs and ours[: len(theirs)] == theirs
