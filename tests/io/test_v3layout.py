"""DeepSeek-V3 checkpoint layout (multitoken.io.v3layout): a folder written by hand imports to heads
that compute docs/design.md §DeepSeek modules, write/load round-trips bit for bit, transformers' own
``generate(use_mtp=True)`` reads what we write, and broken folders give one-line errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, micro_deepseek, micro_llama, perturb_heads
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel
from transformers.utils import logging as hf_logging

from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.errors import MultitokenError
from multitoken.io.v3layout import load_v3_layout, mtp_depth, write_v3_layout
from multitoken.model import MTPModel

PROMPT = [5, 6, 7, 8, 9, 10]
EXTRAS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")

TRUNKS = {"llama": micro_llama, "deepseek_v3": micro_deepseek}


def trained_looking(trunk, depth: int) -> MTPModel:
    """DeepSeek heads whose norms are not the identity and whose weights are not at init."""
    return perturb_heads(MTPModel(trunk, HeadConfig(family="deepseek", depth=depth)), 3, 0.2)


def written(model: MTPModel, folder: Path) -> Path:
    folder.mkdir()
    write_v3_layout(model, folder)
    return folder


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ------------------------------------------------------------------------------------------------
# A folder written by hand, and docs/design.md's equations computed here without multitoken
# ------------------------------------------------------------------------------------------------


def stored_block_shapes(trunk) -> dict[str, tuple[int, ...]]:
    """The names and shapes under which a checkpoint stores one MTP block: a trunk layer's, with
    DeepSeek-V3's routed experts one tensor per expert (they are fused in memory)."""
    config = trunk.config
    shapes = {n: tuple(t.shape) for n, t in trunk.model.layers[-1].state_dict().items()}
    if "mlp.experts.gate_up_proj" in shapes:
        del shapes["mlp.experts.gate_up_proj"], shapes["mlp.experts.down_proj"]
        inner, d = config.moe_intermediate_size, config.hidden_size
        for e in range(config.n_routed_experts):
            shapes[f"mlp.experts.{e}.gate_proj.weight"] = (inner, d)
            shapes[f"mlp.experts.{e}.up_proj.weight"] = (inner, d)
            shapes[f"mlp.experts.{e}.down_proj.weight"] = (d, inner)
    return shapes


def write_by_hand(trunk, folder: Path, depth: int) -> list[dict[str, torch.Tensor]]:
    """The trunk saved by transformers, then D modules added as ``model.layers.{L+k}.*`` tensors
    with known random values, and D in config.json: DeepSeek-V3's layout, without multitoken."""
    trunk.save_pretrained(folder)
    g = torch.Generator().manual_seed(11)
    d, L = trunk.config.hidden_size, trunk.config.num_hidden_layers
    tensors = load_file(folder / "model.safetensors")
    shapes = stored_block_shapes(trunk)
    shapes.update({n: (d,) for n in EXTRAS})
    shapes["eh_proj.weight"] = (d, 2 * d)
    modules = []
    for k in range(depth):
        w = {}
        for name, shape in shapes.items():
            noise = torch.randn(shape, generator=g)
            w[name] = 1 + 0.3 * noise if name.endswith("norm.weight") else 0.2 * noise
        w["embed_tokens.weight"] = trunk.get_input_embeddings().weight.detach().clone()
        w["shared_head.head.weight"] = trunk.get_output_embeddings().weight.detach().clone()
        tensors.update({f"model.layers.{L + k}.{n}": t for n, t in w.items()})
        modules.append(w)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = depth
    (folder / "config.json").write_text(json.dumps(config))
    return modules


def reference_block(trunk, w: dict[str, torch.Tensor]) -> torch.nn.Module:
    """One decoder layer of the trunk's class holding module weights ``w``: MoE even where the
    trunk's first layers are dense (DeepSeek-V3's MTP layers are), experts fused here by hand."""
    config = copy.deepcopy(trunk.config)
    if getattr(config, "first_k_dense_replace", None):
        config.first_k_dense_replace = 0
    layer = type(trunk.model.layers[-1])(config, layer_idx=0)
    skip = (*EXTRAS, "embed_tokens.weight", "shared_head.head.weight")
    state = {n: t for n, t in w.items() if n not in skip and ".experts." not in n}
    if any(".experts." in n for n in w):
        E = config.n_routed_experts
        up = [
            torch.cat([w[f"mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")])
            for e in range(E)
        ]
        state["mlp.experts.gate_up_proj"] = torch.stack(up)  # [E, 2 * inner, d]
        state["mlp.experts.down_proj"] = torch.stack(
            [w[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)]
        )  # [E, d, inner]
    layer.load_state_dict(state)
    return layer.eval()


@torch.no_grad()
def logits_by_hand(trunk, modules, blocks, seq: torch.Tensor, T: int, depth: int) -> list:
    """docs/design.md §DeepSeek modules over positions 0..T-1 of ``seq`` [1, >= T + depth]:
    h'^k = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), h^k = block_k(h'^k, causal),
    logits^k = Unembed(shared_head.norm_k(h^k)), with h^0 the trunk's last hidden state."""
    eps = trunk.config.rms_norm_eps
    emb_w, unemb_w = trunk.get_input_embeddings().weight, trunk.get_output_embeddings().weight
    h = trunk(seq[:, :T], output_hidden_states=True).hidden_states[-1]  # [1, T, d]
    pos = torch.arange(T)[None]
    kwargs = {
        "attention_mask": torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None],
        "position_ids": pos,
        "position_embeddings": trunk.model.rotary_emb(h, position_ids=pos),
    }
    out = []
    for k in range(1, depth + 1):
        w, block = modules[k - 1], blocks[k - 1]
        emb = emb_w[seq[0, k : k + T]][None]  # [1, T, d]: t_{i+k}
        both = torch.cat([rms(emb, w["enorm.weight"], eps), rms(h, w["hnorm.weight"], eps)], -1)
        h = block(both @ w["eh_proj.weight"].T, **kwargs)
        h = h[0] if isinstance(h, tuple) else h
        out.append(rms(h, w["shared_head.norm.weight"], eps) @ unemb_w.T)  # [1, T, V]
    return out


class RecordedHeads(torch.nn.Module):
    """The real heads, with every draft call's committed tokens and drafts recorded."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def __getattr__(self, name):  # what the protocol says of the family: the inner heads'
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def new_draft_state(self, batch):
        return self.inner.new_draft_state(batch)

    def draft(self, state, step, K, pick):
        drafts, q = self.inner.draft(state, step, K, pick)
        self.calls.append((step.tokens[0].clone(), drafts[0].tolist()))
        return drafts, q


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_hand_written_folder_imports_to_the_design_equations(arch, tmp_path):
    D = 2
    trunk = TRUNKS[arch]()
    modules = write_by_hand(trunk, tmp_path, D)
    blocks = [reference_block(trunk, w) for w in modules]
    model = load_v3_layout(tmp_path)
    model.trunk.set_attn_implementation("eager")
    assert model.depth == D and model.family == "deepseek"

    # teacher-forced logits of every module
    T = 9
    seq = torch.randint(3, VOCAB, (1, T + D), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.trunk_forward(seq[:, :T])
        ours = model.heads(out.hidden, seq, out.block_kwargs)
    hand = logits_by_hand(model.trunk, modules, blocks, seq, T, D)
    for k in range(D):
        torch.testing.assert_close(ours[k], hand[k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hand[0], hand[1], atol=1e-2)  # the two modules differ

    # free-running greedy drafts during decoding: d_k from module k on committed + d_1..d_{k-1}
    recorded = RecordedHeads(model.heads)
    model.heads = recorded
    generate(model, [PROMPT], max_new_tokens=12, tree="chain", draft_len=D)
    assert len(recorded.calls) >= 3
    for committed, drafts in recorded.calls:
        n, seq = committed.numel() - 1, committed[None]  # h^0 is known at positions 0..n-1
        expected = []
        for k in range(1, D + 1):
            logits = logits_by_hand(model.trunk, modules, blocks, seq, n, k)[k - 1]
            expected.append(int(logits[0, n - 1].argmax()))
            seq = torch.cat([seq, torch.tensor([[expected[-1]]])], dim=1)
        assert drafts == expected


def test_deepseek_v3_mtp_blocks_are_moe_and_follow_the_trunk_attention():
    model = MTPModel(micro_deepseek(layers=2, dense=2), HeadConfig(family="deepseek", depth=2))
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in model.parts.layers)
    for module in model.heads.mtp:  # DeepSeek-V3's MTP layers are MoE, like transformers builds
        assert type(module.block.mlp).__name__ == "DeepseekV3MoE"
    model.trunk.set_attn_implementation("sdpa")
    assert model.heads.mtp[1].block.self_attn.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_write_then_load_is_bit_identical(arch, tmp_path, caplog):
    model = trained_looking(TRUNKS[arch](), depth=2)
    folder = written(model, tmp_path / "v3")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == config["num_mtp_layers"] == 2 == mtp_depth(folder)
    L = model.parts.num_layers
    keys = set(load_file(folder / "model.safetensors"))
    for k in range(2):
        for name in (*EXTRAS, "embed_tokens.weight", "shared_head.head.weight"):
            assert f"model.layers.{L + k}.{name}" in keys
    if arch == "deepseek_v3":  # experts one tensor each, as DeepSeek-V3's checkpoint has them
        assert f"model.layers.{L + 1}.mlp.experts.3.up_proj.weight" in keys
    caplog.clear()
    verbosity = hf_logging.get_verbosity()
    loaded = load_v3_layout(folder)
    assert caplog.records == []  # no load report about the model.layers.{L+k} keys
    assert hf_logging.get_verbosity() == verbosity  # silenced for the load only
    loaded.trunk.set_attn_implementation("eager")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    loaded.trunk.save_pretrained(tmp_path / "trunk")  # the trunk alone announces no modules
    assert mtp_depth(tmp_path / "trunk") == 0
    ours = generate(model, [PROMPT, PROMPT[:2]], max_new_tokens=16, tree="chain", draft_len=3)
    theirs = generate(loaded, [PROMPT, PROMPT[:2]], max_new_tokens=16, tree="chain", draft_len=3)
    assert ours.tokens == theirs.tokens
    assert ours.stats.acceptance == theirs.stats.acceptance


# ------------------------------------------------------------------------------------------------
# transformers' own MTP path: generate(use_mtp=True)
# ------------------------------------------------------------------------------------------------


def hf_greedy(hf, prompt: list[int], n: int, **extra) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **extra)
    return out[0, len(prompt) :].tolist()


def hf_from(folder: Path):
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.set_attn_implementation("eager")
    return hf


def register_mtp_keys(hf, depth: int) -> None:
    """What transformers' MtpModel looks for: the main model's ``_keys_to_ignore_on_load_
    unexpected`` patterns (DeepSeek-V3 registers ``model\\.layers\\.61.*``, Llama none)."""
    L = hf.config.num_hidden_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\." for k in range(depth)]


@pytest.mark.parametrize("depth", [1, 2])
def test_transformers_use_mtp_on_llama(depth, tmp_path):
    model = trained_looking(micro_llama(), depth)
    hf = hf_from(written(model, tmp_path / "v3"))
    with pytest.raises(ValueError) as err:
        hf_greedy(hf, PROMPT, 4, use_mtp=True)
    assert (
        str(err.value) == "LlamaForCausalLM does not seem to register any known MTP layer patterns"
    )
    register_mtp_keys(hf, depth)  # with the patterns a DeepSeek-V3 class carries, it runs
    plain = hf_greedy(hf, PROMPT, 14)
    assert hf_greedy(hf, PROMPT, 14, use_mtp=True) == plain
    assert generate(model, [PROMPT], max_new_tokens=14).tokens == [plain]


def test_transformers_use_mtp_on_deepseek_v3(tmp_path):
    # DeepseekV3ForCausalLM finds MTP weights only at model.layers.61 (the released model's L):
    # a 61-layer trunk (dense but for the last) loads its one module with no help.
    model = trained_looking(micro_deepseek(layers=61, dense=60), depth=1)
    hf = hf_from(written(model, tmp_path / "d1"))
    plain = hf_greedy(hf, PROMPT, 10)
    assert hf_greedy(hf, PROMPT, 10, use_mtp=True) == plain
    assert generate(model, [PROMPT], max_new_tokens=10).tokens == [plain]

    # a second module, at model.layers.62, is not found
    model = MTPModel(model.trunk, HeadConfig(family="deepseek", depth=2)).eval()
    hf = hf_from(written(model, tmp_path / "d2"))
    with pytest.raises(RuntimeError) as err:
        hf_greedy(hf, PROMPT, 4, use_mtp=True)
    assert str(err.value).startswith(
        f"The following MtpModel weights are missing from {tmp_path / 'd2'} (checkpoint keys "
        "not matching the conversion mapping?): ['layers.1.eh_proj.weight', "
    )


def test_transformers_mtp_layer_hands_on_the_normed_state(tmp_path):
    """Module 1 computes what ours does; module 2 reads shared_head.norm_1(h^1) where ours (and
    the paper, and vLLM) read h^1."""
    model = trained_looking(micro_llama(), depth=2)
    hf = hf_from(written(model, tmp_path / "v3"))
    register_mtp_keys(hf, 2)
    mtp = MtpModel.from_pretrained(hf).eval()
    T = 9
    seq = torch.randint(3, VOCAB, (1, T + 2), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        h0 = hf(seq[:, :T], output_hidden_states=True).hidden_states[-1]
        t1 = mtp.forward_layer(0, h0, pos, None, input_ids=seq[:, 1 : 1 + T])
        t2 = mtp.forward_layer(1, t1, pos, None, input_ids=seq[:, 2 : 2 + T])
        out = model.trunk_forward(seq[:, :T])
        ours = model.heads(out.hidden, seq, out.block_kwargs)
        torch.testing.assert_close(hf.lm_head(t1), ours[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hf.lm_head(t2), ours[1], atol=1e-2)
        m1, m2 = model.heads.mtp
        emb = model.parts.embed
        h1 = m1(out.hidden, emb(seq[:, 1 : 1 + T]), out.block_kwargs)
        h2 = m2(m1.shared_head["norm"](h1), emb(seq[:, 2 : 2 + T]), out.block_kwargs)
        torch.testing.assert_close(
            hf.lm_head(t2), model.heads.out_head(1, h2), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------------------------------------
# init_from_trunk
# ------------------------------------------------------------------------------------------------


def test_init_from_trunk_copies_the_last_layer_into_each_block():
    config = HeadConfig(family="deepseek", depth=2)
    config.init_from_trunk = True
    model = MTPModel(micro_llama(), config)
    last = model.parts.layers[-1].state_dict()
    for module in model.heads.mtp:
        block = module.block.state_dict()
        assert block.keys() == last.keys() and all(torch.equal(block[n], last[n]) for n in last)
    fresh = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=1)).heads.mtp[0]
    assert not torch.equal(
        fresh.block.mlp.up_proj.weight, model.parts.layers[-1].mlp.up_proj.weight
    )

    config = HeadConfig(family="deepseek", depth=1)
    config.init_from_trunk = True  # a dense last layer cannot seed an MoE block
    with pytest.raises(MultitokenError, match="DeepseekV3DecoderLayer") as err:
        MTPModel(micro_deepseek(layers=1, dense=1), config)
    assert err.value.flag == "--init-from-trunk"


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def one_line_error(folder: Path) -> str:
    with pytest.raises(MultitokenError) as err:
        load_v3_layout(folder)
    assert err.value.flag == "--checkpoint"
    text = str(err.value)
    assert "\n" not in text and not text.startswith("--")
    return text


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "arch,key,change",
    [
        ("llama", "model.layers.3.eh_proj.weight", "drop"),
        ("llama", "model.layers.2.mlp.down_proj.weight", "shape"),
        ("llama", "model.layers.3.shared_head.norm.weight", "shape"),
        ("deepseek_v3", "model.layers.2.mlp.experts.3.up_proj.weight", "drop"),
        ("deepseek_v3", "model.layers.3.mlp.experts.0.down_proj.weight", "shape"),
    ],
)
def test_missing_or_misshapen_mtp_key_is_named(arch, key, change, tmp_path):
    folder = written(trained_looking(TRUNKS[arch](), depth=2), tmp_path / "v3")

    def edit(tensors):
        if change == "drop":
            del tensors[key]
        else:
            tensors[key] = torch.zeros(3, 5)

    edit_tensors(folder, edit)
    text = one_line_error(folder)
    assert key in text
    assert ("is missing" if change == "drop" else "has shape [3, 5], expected") in text


@pytest.mark.parametrize("shared", ["embed_tokens", "shared_head.head"])
def test_module_with_its_own_embedding_or_head_is_refused(shared, tmp_path):
    folder = written(trained_looking(micro_llama(), depth=2), tmp_path / "v3")
    edit_tensors(folder, lambda t: t[f"model.layers.3.{shared}.weight"].add_(1.0))
    text = one_line_error(folder)
    what = "embedding" if shared == "embed_tokens" else "head"
    assert re.search(rf"MTP module 2 has its own {what} \(model\.layers\.3\.{shared}\.weight", text)
    assert "multitoken supports only modules that share" in text


def test_layout_without_the_shared_copies_loads(tmp_path):
    """Exporters other than DeepSeek's leave the embedding/head copies out; they are shared."""
    model = trained_looking(micro_llama(), depth=2)
    folder = written(model, tmp_path / "v3")

    def drop(tensors):
        for k in (2, 3):
            del tensors[f"model.layers.{k}.embed_tokens.weight"]
            del tensors[f"model.layers.{k}.shared_head.head.weight"]

    edit_tensors(folder, drop)
    loaded = load_v3_layout(folder)
    for name, p in model.heads.state_dict().items():
        assert torch.equal(p, loaded.heads.state_dict()[name]), name


def test_folder_without_mtp_modules_and_other_families_are_refused(tmp_path):
    micro_llama().save_pretrained(tmp_path / "plain")
    assert "holds no MTP modules" in one_line_error(tmp_path / "plain")
    (tmp_path / "out").mkdir()
    bpd = MTPModel(micro_llama(), HeadConfig(family="bpd", depth=2))
    with pytest.raises(MultitokenError, match="^only deepseek heads") as err:
        write_v3_layout(bpd, tmp_path / "out")
    assert err.value.flag == "--format"
    ds = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=1))
    with pytest.raises(MultitokenError, match=" must be an existing empty folder$") as err:
        write_v3_layout(ds, tmp_path / "plain")
    assert err.value.flag == "--out"
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_trunk_weight_is_named(tmp_path):
    folder = written(trained_looking(micro_llama(), depth=1), tmp_path / "v3")
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "trunk weight model.layers.1.mlp.up_proj.weight is missing" in one_line_error(folder)


def test_meta_heads_are_built_like_the_layer_they_sit_beside():
    """On a trunk whose first layer is dense and the rest MoE, a Meta head beside the last
    layer is MoE too, and with init_from_trunk starts as that layer's exact copy."""
    trunk = micro_deepseek(layers=2, dense=1)
    model = MTPModel(trunk, HeadConfig(family="meta", depth=2, init_from_trunk=True))
    last = trunk.model.layers[-1]
    for head in model.heads.layers:
        assert type(head.mlp) is type(last.mlp) and type(head.mlp) is not type(
            trunk.model.layers[0].mlp
        )
        assert head.self_attn.layer_idx == 0  # its own KV cache slot
        for name, p in last.state_dict().items():
            assert torch.equal(p, head.state_dict()[name]), name
    assert (
        generate(model, [PROMPT], max_new_tokens=8).tokens
        == generate(model, [PROMPT], max_new_tokens=8, speculate=False).tokens
    )
