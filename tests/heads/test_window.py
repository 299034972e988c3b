"""Head blocks attend with their trunk layer's own mask kind (issue 9, item 1): a Meta head built
like a sliding-window layer b, or a DeepSeek block whose kind is sliding attention, sees only the
last ``window`` positions in the teacher-forced forward, in Meta's memory-efficient loss and in
decoding, so that past the window training, memory-efficient training and drafting still agree
(invariant 4 of docs/design.md). References here build their masks by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, micro_llama, mistral, perturb_heads

from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.heads import HeadInputs
from multitoken.model import MTPModel
from multitoken.trunk import run_layer

WINDOW, T = 6, 20
FULL, SLIDING = "full_attention", "sliding_attention"


def mixed_qwen2(window: int = WINDOW, **extra):
    """The same tiny sizes as a Qwen2 trunk whose layer 0 attends over everything and layer 1
    over the last ``window`` positions."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    sizes += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    like = mistral(window).config
    torch.manual_seed(0)
    config = Qwen2Config(
        **{name: getattr(like, name) for name in sizes},
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=1,
        **extra,
    )
    config._attn_implementation = "eager"
    assert config.layer_types == [FULL, SLIDING]
    return AutoModelForCausalLM.from_config(config).eval()


def hand_kwargs(parts, h: torch.Tensor, window: int | None) -> dict:
    """Layer kwargs over positions 0..T-1 with a mask built by hand: i sees j iff
    0 <= i - j < window (window None: all j <= i)."""
    n = h.size(1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (j <= i) & ((i - j < window) if window is not None else True)
    mask = torch.zeros(n, n).masked_fill(~seen, torch.finfo(h.dtype).min)[None, None]
    pos = torch.arange(n)[None]
    return {
        "attention_mask": mask,
        "position_ids": pos,
        "position_embeddings": parts.rotary(h, position_ids=pos),
    }


def rows(seed: int, length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("branch", [0, 1])
def test_meta_heads_attend_over_the_window_in_training(branch):
    model = perturb_heads(
        MTPModel(mistral(WINDOW), HeadConfig(family="meta", depth=2, branch_layer=branch)),
        scale=0.3,
    )
    tokens = rows(0, T + 1)
    parts = model.parts
    with torch.no_grad():
        out = model.trunk_forward(tokens[:, :-1], branch)
        inputs = HeadInputs(
            tokens=tokens,
            hidden=out.hidden,
            branch=out.branch_hidden,
            block_kwargs=out.block_kwargs,
        )
        got = model.heads.training_logits(inputs)
        stream = out.branch_hidden  # [2, T, d]
        for k, layer in enumerate(model.heads.layers):

            def logits(kwargs, s=stream, layer=layer):
                return parts.unembed(parts.final_norm(run_layer(layer, s, kwargs)))

            windowed = logits(hand_kwargs(parts, stream, WINDOW))
            torch.testing.assert_close(got[k], windowed, rtol=1e-5, atol=1e-5)
            full = logits(hand_kwargs(parts, stream, None))  # what the heads did before
            torch.testing.assert_close(full[:, :WINDOW], windowed[:, :WINDOW])
            assert not torch.allclose(full[:, WINDOW:], windowed[:, WINDOW:], atol=1e-3)
            for i in (WINDOW, T - 1):  # position i sees exactly the last WINDOW positions
                span = stream[:, i - WINDOW + 1 : i + 1]
                pos = torch.arange(i - WINDOW + 1, i + 1)[None]
                alone = parts.block_kwargs(span, pos)  # full causal over the span alone
                h = run_layer(layer, span, alone)[:, -1]
                torch.testing.assert_close(
                    got[k][:, i], parts.unembed(parts.final_norm(h)), rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize(
    "trunk,branch",
    [(mistral, 0), (mistral, 1), (mixed_qwen2, 0), (mixed_qwen2, 1)],
    ids=["mistral-b0", "mistral-b1", "qwen2-full-b0", "qwen2-sliding-b1"],
)
def test_meta_memory_efficient_loss_equals_naive_past_the_window(trunk, branch):
    """The memory-efficient loss runs the heads and the trunk's layers b..L-1 itself, from the
    arguments the trunk gave layer b: each layer must still get its own kind's mask (on the
    mixed Qwen2 with b = 0, layer 1 slides while layer 0 does not)."""
    config = HeadConfig(family="meta", depth=2, branch_layer=branch)
    model = perturb_heads(MTPModel(trunk(WINDOW), config), scale=0.3).train()
    tokens = rows(1, T + 1)
    results = []
    for efficient in (True, False):
        model.zero_grad()
        out = model(tokens, lam=0.8, memory_efficient=efficient)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.main_loss, out.head_losses, grads))
    (l1, m1, h1, g1), (l2, m2, h2, g2) = results
    torch.testing.assert_close(m1, m2)  # the trunk's own path
    torch.testing.assert_close(h1, h2)  # every head
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def deepseek_by_hand(model: MTPModel, tokens: torch.Tensor, windows: list) -> list:
    """DeepSeek-V3 §2.2 module by module, module k's block with a hand-built mask of
    ``windows[k-1]``: the logits of each module over positions 0..T-1, [B, T, V]."""
    parts = model.parts
    h = model.trunk_forward(tokens[:, :T]).hidden
    out = []
    for k, window in enumerate(windows, start=1):
        mod = model.heads.mtp[k - 1]
        e = parts.embed(tokens[:, k : k + T])
        mixed = mod.eh_proj(torch.cat([mod.enorm(e), mod.hnorm(h)], dim=-1))
        h = run_layer(mod.block, mixed, hand_kwargs(parts, mixed, window))
        out.append(parts.unembed(mod.shared_head["norm"](h)))
    return out


@pytest.mark.parametrize(
    "trunk,windows",
    [(mistral, [WINDOW, WINDOW]), (mixed_qwen2, [None, WINDOW])],
    ids=["mistral", "qwen2-mtp_layer_types"],
)
def test_deepseek_blocks_attend_with_their_layer_kind_in_training(trunk, windows):
    """Mistral: every block slides. Qwen2 with ``mtp_layer_types`` [full, sliding]: module 1
    attends over everything and module 2 over the window."""
    extra = {} if trunk is mistral else {"mtp_layer_types": [FULL, SLIDING]}
    model = perturb_heads(
        MTPModel(trunk(WINDOW, **extra), HeadConfig(family="deepseek", depth=2)), 0, 0.3
    )
    tokens = rows(2, T + 2)
    with torch.no_grad():
        out = model.trunk_forward(tokens[:, :T])
        inputs = HeadInputs(
            tokens=tokens, hidden=out.hidden, branch=None, block_kwargs=out.block_kwargs
        )
        got = model.heads.training_logits(inputs)
        expected = deepseek_by_hand(model, tokens, windows)
        before = deepseek_by_hand(model, tokens, [None, None])  # what the blocks did before
    for k in range(2):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[-1][:, WINDOW:], expected[-1][:, WINDOW:], atol=1e-3)
    assert [m.kind for m in model.heads.mtp] == [FULL if w is None else SLIDING for w in windows]


@pytest.mark.parametrize("family", ["meta", "deepseek"])
def test_sliding_heads_decode_losslessly_past_the_window(family):
    # seeds and scales at which some drafts are accepted (a fresh deepseek module drafts the
    # trunk's next token for the one after it, which this trunk seldom repeats)
    seed, scale = (0, 0.3) if family == "meta" else (4, 0.1)
    config = HeadConfig(family=family, depth=2)
    model = perturb_heads(MTPModel(mistral(WINDOW), config), seed=seed, scale=scale)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    spec = generate(model, prompts, max_new_tokens=T, tree="chain", draft_len=2)
    for prompt, tokens in zip(prompts, spec.tokens):
        assert tokens == hf_greedy(model, prompt, T)
    assert 0 < spec.stats.acceptance[0] < 1  # drafts were both accepted and rejected
    # (with this trunk generate decodes such a batch row by row; tests/heads/test_drafting.py
    # drafts for rows with holes in one batch)


def test_a_full_attention_trunk_keeps_its_heads_full():
    model = MTPModel(micro_llama(), HeadConfig(family="meta", depth=1))
    assert model.heads.kind == FULL and model.parts.window(model.heads.kind) is None
    ds = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=2))
    assert [m.kind for m in ds.heads.mtp] == [FULL, FULL]
