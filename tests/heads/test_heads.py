"""Invariants 4 and 5 of docs/design.md: each family's loss follows its equations (computed
here independently, by hand from the trunk's parts), and Meta's memory-efficient backward gives
the naive path's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_llama

from multitoken.config import HeadConfig
from multitoken.model import MTPModel


def ce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over all given positions. logits [N, V], targets [N]."""
    logp = logits.float().log_softmax(-1)
    return -torch.stack([logp[i, t] for i, t in enumerate(targets.tolist())]).mean()


def rmsnorm(x: torch.Tensor, norm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def causal_kwargs(trunk, h: torch.Tensor) -> dict:
    T = h.size(1)
    pos = torch.arange(T).unsqueeze(0)
    mask = torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None]
    return {
        "attention_mask": mask,
        "position_ids": pos,
        "position_embeddings": trunk.model.rotary_emb(h, position_ids=pos),
    }


def trunk_pass(trunk, tokens):
    out = trunk(tokens[:, :-1], output_hidden_states=True)
    return out.logits, out.hidden_states


def main_loss(logits, tokens):
    return ce_by_hand(logits[0], tokens[0, 1:])


@pytest.mark.parametrize("unembed", ["shared", "per-head"])
def test_bpd_loss_by_hand(tokens, unembed):
    tokens = tokens[:1]
    model = MTPModel(micro_llama(), HeadConfig(family="bpd", depth=2, bpd_unembed=unembed))
    with torch.no_grad():  # a trained-looking head: non-zero output projection, distinct unembed
        model.heads.w_out.normal_(0, 0.3)
        if model.heads.unembed_weight is not None:
            model.heads.unembed_weight.add_(torch.randn_like(model.heads.unembed_weight) * 0.1)
    lam = 0.7
    got = model(tokens, lam=lam).loss
    logits, hs = trunk_pass(model.trunk, tokens)
    h0 = hs[-1][0]  # [T, d]
    T = h0.size(0)
    expected = main_loss(logits, tokens)
    for k in (1, 2):
        z = (
            h0
            + F.silu(h0 @ model.heads.w_in[k - 1] + model.heads.b_in[k - 1])
            @ model.heads.w_out[k - 1]
        )
        W = model.trunk.lm_head.weight if unembed == "shared" else model.heads.unembed_weight[k - 1]
        head_logits = z @ W.T
        expected = expected + lam * ce_by_hand(head_logits[: T - k], tokens[0, 1 + k :])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unembed", ["shared", "per-head"])
def test_fresh_bpd_head_predicts_what_the_trunk_predicts(tokens, unembed):
    model = MTPModel(micro_llama(), HeadConfig(family="bpd", depth=3, bpd_unembed=unembed))
    out = model.trunk_forward(tokens[:, :-1])
    for head_logits in model.heads(out.hidden):
        torch.testing.assert_close(head_logits, out.logits, rtol=0, atol=1e-6)


def test_meta_heads_copied_from_the_last_layer_predict_what_the_trunk_predicts(tokens):
    config = HeadConfig(family="meta", depth=2, init_from_trunk=True)  # branch layer b = L-1
    model = MTPModel(micro_llama(), config)
    out = model.trunk_forward(tokens[:, :-1], branch_layer=model.heads.branch_layer)
    for head_logits in model.heads(out.branch_hidden, out.block_kwargs):
        torch.testing.assert_close(head_logits, out.logits, rtol=0, atol=1e-6)
    fresh = MTPModel(micro_llama(), HeadConfig(family="meta", depth=1))
    assert not torch.allclose(fresh.heads(out.branch_hidden, out.block_kwargs)[0], out.logits)


@pytest.mark.parametrize("branch", [1, 0])
def test_meta_loss_by_hand(tokens, branch):
    tokens = tokens[:1]
    model = MTPModel(micro_llama(), HeadConfig(family="meta", depth=2, branch_layer=branch))
    got = model(tokens, lam=1.0, memory_efficient=False).loss
    logits, hs = trunk_pass(model.trunk, tokens)
    h_b = hs[branch]  # the residual stream entering layer b
    T = h_b.size(1)
    expected = main_loss(logits, tokens)
    for k in (1, 2):
        h = model.heads.layers[k - 1](h_b, **causal_kwargs(model.trunk, h_b))
        head_logits = model.trunk.lm_head(rmsnorm(h, model.trunk.model.norm))[0]
        expected = expected + ce_by_hand(head_logits[: T - k], tokens[0, 1 + k :])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fresh_deepseek_modules_predict_what_the_trunk_predicts(tokens):
    """A fresh module is the identity on h^{k-1} (eh_proj reads hnorm(h) only, the block's
    residual writes are zero), so every module starts where a fresh BPD head does: the trunk's
    own logits, scaled by 1 / rms(h^0) (hnorm and the OutHead norm rescale h^0 to unit RMS)."""
    model = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=3))
    out = model.trunk_forward(tokens[:, :-1])
    rms = out.hidden.pow(2).mean(-1, keepdim=True).add(model.trunk.config.rms_norm_eps).sqrt()
    for head_logits in model.heads(out.hidden, tokens, out.block_kwargs):
        torch.testing.assert_close(head_logits * rms, out.logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(head_logits.argmax(-1), out.logits.argmax(-1))
    # the token's half of eh_proj starts at zero and learns from the first step
    d = model.parts.hidden_size
    model.trunk.requires_grad_(False)
    optimizer = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    model(tokens, lam=1.0).loss.backward()
    optimizer.step()
    for module in model.heads.mtp:
        assert module.eh_proj.weight[:, :d].abs().sum() > 0
        assert all(p.abs().sum() > 0 for p in module.block.parameters())


def test_deepseek_loss_by_hand(tokens):
    tokens = tokens[:1]
    D, lam = 3, 0.3
    model = MTPModel(micro_llama(), HeadConfig(family="deepseek", depth=D))
    with torch.no_grad():  # non-trivial norms, so enorm/hnorm/shared_head.norm order matters
        g = torch.Generator().manual_seed(0)
        for p in model.heads.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5, generator=g)
            else:  # off the identity start: both halves of eh_proj and every block write count
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    got = model(tokens, lam=lam).loss
    logits, hs = trunk_pass(model.trunk, tokens)
    T = logits.size(1)
    expected = main_loss(logits, tokens)
    h = hs[-1]  # h^0 over positions 0..T-1
    emb = model.trunk.model.embed_tokens
    for k in range(1, D + 1):
        n = T + 1 - k  # positions i with t_{i+k} inside the row; no padding here
        mod = model.heads.mtp[k - 1]
        e = emb(tokens[:, k : k + n])
        mixed = (
            torch.cat([rmsnorm(e, mod.enorm), rmsnorm(h[:, :n], mod.hnorm)], -1)
            @ mod.eh_proj.weight.T
        )
        h = mod.block(mixed, **causal_kwargs(model.trunk, mixed))  # h^k, [1, n, d]
        head_logits = model.trunk.lm_head(rmsnorm(h, mod.shared_head["norm"]))[0]
        # P^k_{i+k+1}: position i predicts t_{i+k+1}, for i + k + 1 <= T
        expected = expected + lam / D * ce_by_hand(head_logits[: T - k], tokens[0, 1 + k :])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", [1, 0])
def test_meta_memory_efficient_backward_equals_naive(tokens, branch):
    model = MTPModel(micro_llama(), HeadConfig(family="meta", depth=3, branch_layer=branch)).train()
    grads = []
    losses = []
    for efficient in (True, False):
        model.zero_grad()
        out = model(tokens, lam=0.8, memory_efficient=efficient)
        (out.loss / 2).backward()  # a scaled backward, as under gradient accumulation
        losses.append((out.loss.detach(), out.head_losses))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    (l1, h1), (l2, h2) = losses
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(h1, h2)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if n.startswith("heads."))


def test_every_family_is_registered_and_implements_the_protocol():
    from multitoken.config import FAMILIES
    from multitoken.errors import MultitokenError
    from multitoken.heads import HEADS, HeadInputs, MTPHeads, head_class

    assert set(HEADS) == set(FAMILIES)
    trunk = micro_llama()
    tokens = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for family, cls in HEADS.items():
        assert issubclass(cls, MTPHeads) and cls.family == family and head_class(family) is cls
        # each overrides the base; parent-free families (bpd, meta) need only their logits
        for name in ("training_logits", "new_draft_state"):
            assert getattr(cls, name) is not getattr(MTPHeads, name), (family, name)
        drafting = [getattr(cls, n) is not getattr(MTPHeads, n) for n in ("draft", "draft_logits")]
        assert any(drafting), family
        model = MTPModel(trunk, HeadConfig(family=family, depth=2))
        assert type(model.heads) is cls
        assert (model.heads.branch_layer is not None) == cls.reads_branch
        branch = model.heads.branch_layer if cls.reads_branch else None
        with torch.no_grad():
            out = model.trunk_forward(tokens[:, :-1], branch)
            inputs = HeadInputs(tokens, out.hidden, out.branch_hidden, out.block_kwargs)
            logits = model.heads.training_logits(inputs)
        assert [tuple(lg.shape) for lg in logits] == [(2, 8, 64)] * 2
        assert model.heads.max_draft_len() == (None if cls.drafts_past_depth else 2)
    with pytest.raises(MultitokenError, match="unknown head family 'medusa'") as err:
        head_class("medusa")
    assert err.value.flag == "--family"
