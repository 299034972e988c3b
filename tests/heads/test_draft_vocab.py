"""Reduced draft vocabulary (FR-Spec): heads unembed over the N most frequent tokens, drafts lie in
that subset, and decoding stays exact — greedy output equals plain greedy, sampled output follows
the trunk's distribution — while the subset travels with the heads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_chi_square_fits,
    micro_llama,
    perturb_heads,
    two_token_counts,
    two_token_law,
)
from helpers import train_tiny, trunk_folder, write_corpus

import multitoken
from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.decode.sampling import Sampling, probs
from multitoken.errors import MultitokenError
from multitoken.heads.draft_vocab import frequent_tokens
from multitoken.io.headfile import HEADS_FILE, HEADS_META, load_heads, save_heads
from multitoken.model import MTPModel
from multitoken.training.losses import IGNORE, OUTSIDE, cross_entropy

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
SUBSET = torch.tensor([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53])


def with_subset(family: str, subset=SUBSET, seed: int = 0, vocab: int = 64, **extra) -> MTPModel:
    config = HeadConfig(family=family, depth=3, draft_vocab=len(subset), **extra)
    model = MTPModel(micro_llama(seed=seed, vocab=vocab), config)
    model.heads.set_draft_vocab(subset)
    return perturb_heads(model, seed)


def test_frequent_tokens_by_count_then_lower_id():
    counts = torch.tensor([5, 0, 9, 5, 1, 0])
    assert frequent_tokens(counts, 3, 6).tolist() == [0, 2, 3]
    assert frequent_tokens(counts, 5, 6).tolist() == [0, 1, 2, 3, 4]  # unseen: lower id first
    with pytest.raises(MultitokenError, match="must be in 1..6, got 7") as err:
        frequent_tokens(counts, 7, 6)
    assert err.value.flag == "--draft-vocab"


def test_draft_vocab_is_validated():
    with pytest.raises(MultitokenError, match="must be an integer >= 1, got 0") as err:
        HeadConfig(family="bpd", draft_vocab=0).validate()
    assert err.value.flag == "--draft-vocab"
    with pytest.raises(MultitokenError, match="^65 exceeds") as err:
        MTPModel(micro_llama(), HeadConfig(family="bpd", draft_vocab=65))
    assert err.value.flag == "--draft-vocab"
    model = with_subset("bpd")
    with pytest.raises(MultitokenError, match="distinct"):
        model.heads.set_draft_vocab(torch.tensor([1] * 16))


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_heads_unembed_over_the_subset_only(family, tokens):
    """With the same weights, the subset head's logits are the full head's at the subset's ids."""
    model = with_subset(family)
    full = MTPModel(model.trunk, HeadConfig(family=family, depth=3))
    state = {k: v for k, v in model.heads.state_dict().items() if k != "draft_ids"}
    full.heads.load_state_dict(state)
    fwd = {"bpd": lambda m, o: m.heads(o.hidden)}
    fwd["meta"] = lambda m, o: m.heads(o.branch_hidden, o.block_kwargs)
    fwd["deepseek"] = lambda m, o: m.heads(o.hidden, tokens, o.block_kwargs)
    with torch.no_grad():
        out = model.trunk_forward(tokens[:, :-1], 1 if family == "meta" else None)
        ours, theirs = fwd[family](model, out), fwd[family](full, out)
    for a, b in zip(ours, theirs):
        assert a.shape[-1] == len(SUBSET)
        torch.testing.assert_close(a, b[..., SUBSET], rtol=1e-5, atol=1e-6)


def test_labels_outside_the_subset_add_no_loss_but_count_as_misses():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, OUTSIDE, IGNORE]])
    loss, acc = cross_entropy(logits, labels)
    want, _ = cross_entropy(logits[:, :2], labels[:, :2])  # only the two labels inside
    torch.testing.assert_close(loss, want)
    assert float(acc) == pytest.approx(2 / 3)  # 2 hits of 3 labels: the outside one is a miss
    model = with_subset("bpd")
    mapped = model.heads.draft_labels(torch.tensor([[3, 4, 53, IGNORE]]))
    assert mapped.tolist() == [[1, OUTSIDE, 15, IGNORE]]
    loss, _ = cross_entropy(logits[:, :1], torch.tensor([[OUTSIDE]]))
    assert float(loss) == 0.0  # nothing to learn from, not NaN


def test_draft_logits_are_minus_infinity_outside_the_subset():
    heads = with_subset("bpd").heads
    small = torch.randn(2, 3, len(SUBSET))
    full = heads.full_logits(small)  # what drafting hands to the token picker
    assert full.shape == (2, 3, 64)
    assert torch.equal(full[..., SUBSET], small)
    outside = torch.ones(64, dtype=torch.bool)
    outside[SUBSET] = False
    assert torch.isneginf(full[..., outside]).all()
    q = probs(full, Sampling(temperature=0.7, top_k=40, top_p=0.9))
    assert (q[..., outside] == 0).all() and torch.allclose(q.sum(-1), torch.ones(2, 3))
    assert torch.equal(full.argmax(-1), SUBSET[small.argmax(-1)])  # greedy: argmax within S


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_greedy_with_a_draft_vocabulary_equals_plain_greedy(family):
    model = with_subset(family)
    plain = generate(model, PROMPTS, max_new_tokens=20, speculate=False)
    for K in (1, 3):
        spec = generate(model, PROMPTS, max_new_tokens=20, tree="chain", draft_len=K)
        assert spec.tokens == plain.tokens, K
    # the drafts lie in the subset: the heads never propose anything else
    seen = []
    real = model.heads.draft

    def spy(state, step, K, sample):
        drafts, q = real(state, step, K, sample)
        seen.append(drafts)
        return drafts, q

    model.heads.draft = spy
    generate(model, PROMPTS, max_new_tokens=20, tree="chain", draft_len=3)
    drafted = torch.cat([d.flatten() for d in seen])
    assert torch.isin(drafted, SUBSET).all()


def test_sampling_with_a_draft_vocabulary_follows_the_trunk_distribution():
    """Invariant 2 with drafts restricted to 3 of 8 tokens: chi-square on the joint law of the
    first two sampled tokens (the second is the first one drafted and verified)."""
    torch.manual_seed(0)
    model = with_subset("bpd", subset=torch.tensor([1, 4, 6]), vocab=8)
    with torch.no_grad():  # heads far from the trunk, so rejections and residuals are exercised
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p))
        model.trunk.lm_head.weight.mul_(4.0)  # peaked, non-uniform distributions
    prompt = [1, 2, 3]
    expected = two_token_law(model.trunk, prompt, 8)  # [64] joint law of (x1, x2)
    n = 2000
    out = generate(
        model, [prompt] * n, max_new_tokens=2, tree="chain", draft_len=1, temperature=1.0, seed=7
    )
    assert 0.05 < out.stats.acceptance[0] < 0.95  # drafts are accepted and rejected
    counts = two_token_counts(out.tokens, 8)
    outside = torch.tensor([t not in (1, 4, 6) for t in range(8)]).repeat(8)
    assert counts[outside].sum() > 0.2 * n  # the trunk's tokens outside the subset do appear
    assert_chi_square_fits(counts, expected)


@pytest.mark.parametrize(
    "family, extra",
    [("bpd", {}), ("bpd", {"bpd_unembed": "per-head"}), ("meta", {}), ("deepseek", {})],
)
def test_heads_files_keep_the_subset(tmp_path, family, extra):
    model = with_subset(family, **extra)
    save_heads(model, tmp_path)
    meta = json.loads((tmp_path / HEADS_META).read_text())
    assert meta["heads"]["draft_vocab"] == len(SUBSET)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / HEADS_FILE))
    assert torch.equal(stored["draft_ids"], SUBSET)
    if extra:  # a per-head unembedding keeps only the subset's rows, started as the trunk's
        assert stored["unembed_weight"].shape == (3, len(SUBSET), 32)
        config = HeadConfig(family=family, depth=3, draft_vocab=len(SUBSET), **extra)
        fresh = MTPModel(micro_llama(0), config)
        fresh.heads.set_draft_vocab(SUBSET)
        rows = fresh.trunk.lm_head.weight[SUBSET]
        assert all(torch.equal(w, rows) for w in fresh.heads.unembed_weight.detach())
    else:  # a shared unembedding is the trunk's: nothing of it is stored
        assert set(stored) == set(model.heads.state_dict()) and "unembed_weight" not in stored
    loaded = load_heads(micro_llama(0), tmp_path)
    assert torch.equal(loaded.heads.draft_ids, SUBSET)
    for temperature in (0.0, 1.0):
        kwargs = dict(max_new_tokens=12, tree="chain", draft_len=3, temperature=temperature, seed=3)
        ours, theirs = generate(model, PROMPTS, **kwargs), generate(loaded, PROMPTS, **kwargs)
        assert ours.tokens == theirs.tokens
        assert ours.stats.acceptance == theirs.stats.acceptance
    h = torch.randn(2, 5, 32)
    if family == "bpd":  # the same draft logits, over the same subset
        torch.testing.assert_close(model.heads(h), loaded.heads(h), rtol=0, atol=0)


def test_meta_headwise_backward_matches_naive_with_a_draft_vocabulary(tokens):
    model = with_subset("meta").train()

    def grads(efficient: bool) -> dict:
        model.zero_grad(set_to_none=True)
        model(tokens, lam=0.7, memory_efficient=efficient).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = grads(True), grads(False)
    assert a.keys() == b.keys() and "trunk.lm_head.weight" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_picks_the_most_frequent_tokens_and_resumes_with_them(tmp_path):
    """The trainer counts the training labels, keeps the top N with the heads, and a resumed run
    (and its checkpoint) keeps them."""
    from multitoken.text.tokenizer import ByteTokenizer

    # 'a' most frequent, then 'b', ' ', 'c', then '\n' and eos
    corpus = write_corpus(tmp_path / "corpus", ["aaaa bbb aaaa bbb cc\n" * 12] * 4)
    options = dict(
        family="bpd",
        depth=2,
        trunk=str(trunk_folder(tmp_path / "trunk")),
        freeze_trunk=True,
        draft_vocab=4,
        seq_len=32,
        max_steps=4,
        eval_every=4,
        save_every=2,
        val_fraction=0.3,
    )
    result = train_tiny(tmp_path / "run", corpus, **options)
    want = sorted(ByteTokenizer().encode("ab c"))
    assert result.model.heads.draft_ids.tolist() == want
    assert all(acc <= 1.0 for acc in result.val["head_acc"])
    resumed = train_tiny(tmp_path / "run", corpus, **{**options, "max_steps": 6}, resume=True)
    assert resumed.model.heads.draft_ids.tolist() == want
    loaded = multitoken.load(tmp_path / "run")
    assert loaded.heads.draft_ids.tolist() == want
