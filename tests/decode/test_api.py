"""Decoding invariants of docs/design.md: lossless greedy (1), lossless sampling (2), and cache
equivalence of incremental drafting (3); plus stub heads that always / never get accepted."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    PROMPTS,
    CheckedHeads,
    OracleHeads,
    assert_calibrated,
    assert_chi_square_fits,
    far_from_a_sharp_trunk,
    hf_greedy,
    micro_llama,
    mistral,
    model_of,
    perturb_heads,
    three_token_counts,
    three_token_law,
    two_token_counts,
    two_token_law,
    windowed,
)

from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.decode.costs import CostModel
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel


class CommitSpy:
    """Records the per-row counts every trunk cache commit keeps."""

    def __init__(self, monkeypatch) -> None:
        from multitoken.decode.kvcache import RaggedCache

        self.counts: list[list[int]] = []
        commit = RaggedCache.commit

        def spy(cache, valid):
            if isinstance(valid, list) and cache.config is not None:
                self.counts.append(list(valid))
            commit(cache, valid)

        monkeypatch.setattr(RaggedCache, "commit", spy)

    @property
    def ragged_steps(self) -> int:
        """Steps in which rows of one batch kept different counts."""
        return sum(len(set(c)) > 1 for c in self.counts[1:])


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_speculative_greedy_equals_plain_and_transformers(family, monkeypatch, trained):
    model = trained(family)
    plain = generate(model, PROMPTS, max_new_tokens=24, speculate=False)
    for prompt, tokens in zip(PROMPTS, plain.tokens):
        assert tokens == hf_greedy(model, prompt, 24)
    spy = CommitSpy(monkeypatch)
    for K in (1, 2, 3) + ((6,) if family == "deepseek" else ()):
        spec = generate(
            model, PROMPTS, max_new_tokens=24, tree="chain", draft_len=K
        )  # one batch of 3
        assert spec.tokens == plain.tokens, K
        assert spec.stats.acceptance[0] > 0.3, spec.stats.acceptance  # the heads do draft
        assert spec.stats.trunk_passes < plain.stats.trunk_passes
        for prompt, tokens in zip(PROMPTS, spec.tokens):  # each row equals that row alone
            assert generate(
                model, [prompt], max_new_tokens=24, tree="chain", draft_len=K
            ).tokens == [tokens]
    assert spy.ragged_steps >= 5


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_sliding_window_trunk_decodes_exactly_past_its_window(family):
    """Mistral-style attention over the last 6 tokens only: the trunk cache must roll back past
    the window, and a batch must not let holes shift the window (rows then decode one by one)."""
    trunk = mistral(window=6)
    model = perturb_heads(MTPModel(trunk, HeadConfig(family=family, depth=2)), scale=0.3)
    spec = generate(model, PROMPTS, max_new_tokens=20)
    for prompt, tokens in zip(PROMPTS, spec.tokens):
        assert tokens == hf_greedy(model, prompt, 20)
    assert spec.stats.trunk_passes < 3 * 21  # some drafts were accepted: rollbacks happened


@pytest.mark.parametrize("wrong", [False, True])
def test_stub_heads_always_or_never_accepted(wrong):
    model = model_of("bpd")
    plain = generate(model, PROMPTS, max_new_tokens=21, speculate=False)
    model.heads = OracleHeads(model, wrong)
    K = 4
    spec = generate(model, PROMPTS, max_new_tokens=21, tree="chain", draft_len=K)
    assert spec.tokens == plain.tokens
    if wrong:
        assert spec.stats.acceptance[0] == 0.0 and spec.stats.tau == pytest.approx(1.0)
    else:  # every pass emits K+1 tokens (the bonus path), except a truncated last one
        assert spec.stats.acceptance == [1.0] * K
        per_prompt = -(-20 // (K + 1)) + 1  # prefill + ceil(20 / (K+1)) verify passes
        assert spec.stats.trunk_passes == per_prompt * len(PROMPTS)


def test_a_stop_token_inside_an_accepted_draft_ends_the_row_there():
    """Heads that are always right put the stop token in the middle of an accepted draft: the row
    ends at it (kept as its last token), as plain decoding ends, while the other row goes on."""
    model = model_of("bpd")
    plain = generate(model, PROMPTS, max_new_tokens=21, speculate=False)
    row = plain.tokens[0]
    stop = row[6]  # lands inside the second step's accepted draft (K = 4: steps of 5 tokens)
    end = row.index(stop) + 1
    model.heads = OracleHeads(model, wrong=False)
    spec = generate(model, PROMPTS, max_new_tokens=21, tree="chain", draft_len=4, eos_id=stop)
    assert spec.tokens[0] == row[:end]
    for tokens, full in zip(spec.tokens[1:], plain.tokens[1:]):
        assert tokens == (full[: full.index(stop) + 1] if stop in full else full)
    assert spec.stats.acceptance[0] == 1.0  # the stop came inside accepted drafts


@pytest.mark.parametrize("family,K", [("deepseek", 3), ("deepseek", 6), ("meta", 3), ("bpd", 3)])
def test_cached_drafts_equal_full_recomputation_after_many_steps(family, K, monkeypatch, trained):
    model = trained(family)
    checked = CheckedHeads(model)
    model.heads = checked
    spy = CommitSpy(monkeypatch)
    try:
        out = generate(model, PROMPTS, max_new_tokens=30, tree="chain", draft_len=K)
    finally:
        model.heads = checked.inner
    assert checked.checked >= 10
    assert out.stats.acceptance[0] > 0.3 and spy.ragged_steps >= 3  # rows diverge in length


@pytest.mark.parametrize("draft_len", [2, "auto"])
def test_sampled_speculative_decoding_follows_the_trunk_distribution(draft_len):
    """Invariant 2: chi-square on the joint law of the first two sampled tokens, vocabulary 8.
    ``auto``: with these costs it verifies K = 1 of the 2 drafts the stateful chain drafts."""
    torch.manual_seed(0)
    model = far_from_a_sharp_trunk(model_of("deepseek", depth=2, vocab=8), 6.0)
    prompt = [1, 2, 3]
    expected = two_token_law(model.trunk, prompt, 8)  # [64] joint law of (x1, x2)
    n = 3000
    costs = CostModel([1.0, 1.05, 4.0], t1_s=1e-3, prior_draft=0.05, learn_draft=False)
    options = dict(tree="chain", draft_len=draft_len, temperature=1.0, seed=7, costs=costs)
    out = generate(model, [prompt] * n, max_new_tokens=3, **options)
    assert out.stats.draft_lens[0] == (2 if draft_len == 2 else 1)
    assert out.stats.acceptance[0] < 0.8  # drafts do get rejected
    assert_chi_square_fits(two_token_counts(out.tokens, 8), expected)


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 3, 1.0), (0.6, 0, 0.8)])
def test_sampling_is_exact_at_both_draft_positions_for_every_family(
    family, temperature, top_k, top_p
):
    """Invariant 2 over the first three tokens (vocabulary 4, K = 2): x2 is verified at the first
    draft's position and x3 at the second's or is the bonus token, so a q read for the wrong
    draft or a bonus taken from the wrong position shows; the temperature warps and top-k and
    top-p truncate both p and q (a q left at temperature 1 shows too). The trunk runs sdpa, as
    real checkpoints do."""
    from multitoken.decode.sampling import Sampling

    torch.manual_seed(0)
    model = far_from_a_sharp_trunk(model_of(family, depth=2, vocab=4, attn="sdpa"), 4.0)
    prompt = [1, 2, 3]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = three_token_law(model.trunk, prompt, 4, Sampling(**sampling))  # [64]
    options = dict(tree="chain", draft_len=2, seed=11, **sampling)
    out = generate(model, [prompt] * 2500, max_new_tokens=3, **options)
    assert out.stats.draft_lens[0] == 2
    assert 0 < out.stats.acceptance[0] < 0.9  # drafts are both accepted and rejected
    assert_chi_square_fits(three_token_counts(out.tokens, 4), expected)


@pytest.mark.parametrize("family", ["bpd", "deepseek"])
@pytest.mark.parametrize("tree", ["2,2", None], ids=["tree", "default"])
def test_sampled_trees_are_exact_at_other_temperatures_with_top_k_and_top_p(family, tree):
    """Invariant 2 through trees (a fixed one, and the default ``auto+lookup``) at temperature
    0.6 with top-k 3 and top-p 0.8: p and every draft q must be warped and truncated alike, or
    the first three tokens' joint law shows it."""
    from multitoken.decode.sampling import Sampling

    torch.manual_seed(1)
    model = far_from_a_sharp_trunk(model_of(family, depth=2, vocab=4), 2.0)
    prompt = [1, 2, 3]
    sampling = dict(temperature=0.6, top_k=3, top_p=0.8)
    expected = three_token_law(model.trunk, prompt, 4, Sampling(**sampling))  # [64]
    shape = {} if tree is None else {"tree": tree}
    out = generate(model, [prompt] * 2500, max_new_tokens=3, seed=5, **shape, **sampling)
    if tree is not None:
        assert 0 < out.stats.acceptance[0] < 0.95  # drafts are both accepted and rejected
    assert_chi_square_fits(three_token_counts(out.tokens, 4), expected)


@pytest.mark.parametrize("tree", ["chain", "2,2"])
def test_a_five_percent_acceptance_bias_shows_end_to_end(tree):
    """Power, through ``generate`` itself: a trunk whose law is p = (0.45, 0.40, 0.10, 0.05)
    after every prefix (every token embeds alike, and the unembedding maps the one final state
    to log p) and fresh BPD heads drafting from the draft vocabulary {0, 1}, so q is p
    restricted to it and renormalised — a draft close to the trunk but over-confident, as
    trained heads are. A draft is accepted with probability p(0) + p(1) = 0.85; accepting with
    min(1, 1.05 p/q) instead would take 0.04 of the 0.15 the other two tokens should keep, which
    4,000 rows show."""
    torch.manual_seed(0)
    model = MTPModel(micro_llama(vocab=4), HeadConfig(family="bpd", depth=2, draft_vocab=2))
    law = torch.tensor([0.45, 0.40, 0.10, 0.05])
    with torch.no_grad():
        embed = model.trunk.model.embed_tokens.weight
        embed[:] = embed[1]
        h = model.trunk.model(torch.tensor([[1]])).last_hidden_state[0, -1]  # after any prefix
        model.trunk.lm_head.weight[:] = torch.outer(law.log(), h) / h.dot(h)
    model.heads.set_draft_vocab(torch.tensor([0, 1]))
    prompt = [1, 2, 3]
    expected = two_token_law(model.trunk, prompt, 4)  # [16]
    torch.testing.assert_close(expected, torch.outer(law, law).flatten(), rtol=1e-4, atol=1e-6)
    options = dict(tree=tree, draft_len=2, temperature=1.0, seed=13)
    out = generate(model.eval(), [prompt] * 4000, max_new_tokens=2, **options)
    assert 0.75 < out.stats.acceptance[0] < 0.95
    assert_chi_square_fits(two_token_counts(out.tokens, 4), expected)


@pytest.mark.parametrize(
    "family,tree,draft_vocab",
    [
        ("bpd", None, 0),
        ("deepseek", None, 0),
        ("meta", "chain", 0),
        ("deepseek", "2,2", 0),
        ("bpd", "2,2", 24),
        ("deepseek", None, 24),
    ],
)
def test_sampled_tokens_follow_the_trunks_law_deep_into_ragged_rows(family, tree, draft_vocab):
    """Invariant 2 past the first steps: ragged prompts, 32 new tokens a row at temperature 0.7
    with top-k and top-p, rows retiring at their stop token while others go on, caches
    compacted, rates learnt — every token from the fourth on is judged by the trunk's law at
    its position (the default ``auto+lookup``, a chain, a fixed tree, and trees drawn from a
    draft vocabulary)."""
    from multitoken.decode.sampling import Sampling

    torch.manual_seed(2)
    config = HeadConfig(family=family, depth=3, draft_vocab=draft_vocab or None)
    model = MTPModel(micro_llama(vocab=64), config).eval()
    if draft_vocab:
        model.heads.set_draft_vocab(torch.arange(3, 3 + draft_vocab))
    model = far_from_a_sharp_trunk(model, 3.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (2 + r % 11,), generator=g).tolist() for r in range(32)]
    sampling = dict(temperature=0.7, top_k=20, top_p=0.9)
    shape = {} if tree is None else {"tree": tree, "draft_len": 3}
    out = generate(model, prompts, max_new_tokens=32, seed=9, eos_id=5, **shape, **sampling)
    lengths = [len(t) for t in out.tokens]
    assert min(lengths) < 16 and max(lengths) == 32  # rows retired while others went on
    assert 0 < out.stats.acceptance[0] < 0.95 and out.stats.draft_steps > 0
    assert assert_calibrated(model.trunk, prompts, out.tokens, Sampling(**sampling), 3) > 600


def test_typical_acceptance_follows_its_threshold():
    from helpers import accept_typical

    # position 0: peaked (low entropy) -> threshold eps; position 1: flat -> lower threshold
    p = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    assert accept_typical(torch.tensor([0, 3]), p, 0.09, g)[0] == 2  # both plausible
    assert accept_typical(torch.tensor([1, 3]), p, 0.09, g)[0] == 0  # 0.01 < 0.09


def test_typical_acceptance_is_opt_in_and_says_it_is_lossy(caplog):
    model = model_of("bpd")
    with caplog.at_level("WARNING", logger="multitoken"):
        generate(model, PROMPTS[:1], max_new_tokens=5, temperature=1.0, typical=0.09)
    assert any("lossy" in r.message for r in caplog.records)
    with pytest.raises(MultitokenError, match="typical acceptance samples") as err:
        generate(model, PROMPTS[:1], max_new_tokens=5, typical=0.09)  # greedy: nothing to type
    assert err.value.flag == "--typical"


class TrunkSpy:
    """Records, for every trunk forward, how many tokens went in and how many positions' logits
    were asked for and came out."""

    def __init__(self, model: MTPModel) -> None:
        self.calls: list[tuple[int, object, int]] = []
        self.hooks = [
            model.trunk.register_forward_pre_hook(self.before, with_kwargs=True),
            model.trunk.register_forward_hook(self.after, with_kwargs=True),
        ]

    def before(self, _module, _args, kwargs):
        keep = kwargs.get("logits_to_keep", 0)
        self.asked = keep.tolist() if torch.is_tensor(keep) else keep
        self.q = kwargs["input_ids"].size(1)

    def after(self, _module, _args, _kwargs, output):
        self.calls.append((self.q, self.asked, output.logits.size(1)))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_prefill_computes_logits_at_each_rows_last_position_only(family):
    model = model_of(family, depth=2)
    spy = TrunkSpy(model)
    try:
        alone = generate(model, [PROMPTS[2]], max_new_tokens=6, tree="chain", draft_len=2)
        batch = generate(model, PROMPTS, max_new_tokens=6, tree="chain", draft_len=2)
    finally:
        spy.remove()
    calls = spy.calls
    assert calls[0] == (11, 1, 1)  # one prompt of 11 tokens: the last position's logits only
    prefill = next(c for c in calls[1:] if c[0] == 11)  # the batch: right-padded to 11
    assert prefill == (11, [[4], [0], [10]], 1)  # each row's own last position
    assert alone.tokens == [hf_greedy(model, PROMPTS[2], 6)]
    for prompt, tokens in zip(PROMPTS, batch.tokens):
        assert tokens == hf_greedy(model, prompt, 6)


def test_verify_asks_for_the_k_plus_1_positions_it_checks():
    model = model_of("bpd")
    spy = TrunkSpy(model)
    try:
        generate(model, PROMPTS, max_new_tokens=12, tree="chain", draft_len=3)
        passes_spec = len(spy.calls)
        generate(model, PROMPTS, max_new_tokens=12, speculate=False)
    finally:
        spy.remove()
    spec, plain = spy.calls[1:passes_spec], spy.calls[passes_spec + 1 :]
    assert spec and all(c == (4, 4, 4) for c in spec)  # pending + 3 drafts, 4 logits
    assert plain and all(c == (1, 1, 1) for c in plain)


def test_a_trunk_without_logits_to_keep_decodes_the_same(monkeypatch):
    """Some models take no ``logits_to_keep``: they return every position's logits, and the
    decoder picks each row's last one itself."""
    import multitoken.decode.phases as decoding

    model = model_of("deepseek", depth=2)
    expected = generate(model, PROMPTS, max_new_tokens=8, tree="chain", draft_len=2).tokens
    monkeypatch.setattr(decoding, "_takes_logits_to_keep", lambda cls: False)
    spy = TrunkSpy(model)
    try:
        assert (
            generate(model, PROMPTS, max_new_tokens=8, tree="chain", draft_len=2).tokens == expected
        )
    finally:
        spy.remove()
    assert spy.calls[0] == (11, 0, 11)  # nothing asked: all 11 positions came back


class RowOracleHeads(OracleHeads):
    """Right for rows whose text starts with a token in ``right``, wrong for the others: rows
    accept different counts (whether decoded together or one by one)."""

    def __init__(self, model: MTPModel, right: set[int]) -> None:
        super().__init__(model, wrong=False)
        self.right = right

    def draft(self, state, step, K, pick):
        cont, q = super().draft(state, step, K, pick)
        for r, ids in enumerate(step.tokens):
            if int(ids[0]) not in self.right:
                cont[r] = (cont[r] + 1) % self.model.trunk.config.vocab_size
        return cont, q


def hybrid_qwen2(window: int):
    """A tiny Qwen2 trunk whose first layer slides a ``window`` and whose second attends fully
    (``layer_types``: the model takes prepared masks as one per layer kind)."""
    from transformers import Qwen2Config

    kinds = ["sliding_attention", "full_attention"]
    return windowed(Qwen2Config, window, use_sliding_window=True, layer_types=kinds)


@pytest.mark.parametrize(("build", "window"), [(mistral, 8), (hybrid_qwen2, 20)])
def test_a_batch_past_the_window_stays_batched_and_exact(monkeypatch, build, window):
    """Row 0 accepts every draft and row 1 none: each step appends K+1 slots to both, so the
    batch's cache outgrows the window long before row 1's positions do. A window counts
    positions, so the masks are built from positions (outside review of issue 9: with
    transformers' slot-based mask row 1's logits drifted once the slots passed the window)."""
    from multitoken.decode.kvcache import RaggedCache

    model = MTPModel(build(window), HeadConfig(family="bpd", depth=4)).eval()
    model.heads = RowOracleHeads(model, right={5})  # the first prompt's drafts are right
    widest = {}  # batch size -> most slots a cache of that batch held
    commit = RaggedCache.commit

    def spy(self, valid):
        commit(self, valid)
        widest[self.batch] = max(widest.get(self.batch, 0), self.slots)

    monkeypatch.setattr(RaggedCache, "commit", spy)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    out = generate(model, prompts, max_new_tokens=30, tree="chain", draft_len=4)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == hf_greedy(model, prompt, 30)
    hits, tries = out.stats.head_hits, out.stats.head_tries
    assert hits[3] >= 5 and hits[0] < tries[0]  # row 0 accepted all four drafts, row 1 none
    assert widest[2] > window, widest  # decoded as one batch, its cache past the window


def test_a_trunk_with_a_recurrent_state_is_refused_before_decoding():
    model = model_of("bpd", depth=2)
    model.trunk.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(MultitokenError, match="recurrent state .*LinearAttentionLayer"):
        generate(model, PROMPTS[:1], max_new_tokens=4)
    with pytest.raises(MultitokenError, match="cannot give back"):  # padding is a hole too
        generate(model, PROMPTS, max_new_tokens=4, speculate=False)


def test_the_context_check_reserves_drafts_only_when_speculating():
    """A micro trunk of 128 positions: a prompt of 98 tokens and 30 new ones fill it exactly
    (the trunk reads positions 0..126), so plain decoding runs to the last token; speculation needs room for the drafts of a last verify pass, and the refusal
    names that reserve."""
    model = model_of("deepseek", depth=3)
    prompt = [3 + i % 60 for i in range(98)]
    plain = generate(model, [prompt], max_new_tokens=30, speculate=False)
    assert len(plain.tokens[0]) == 30
    with pytest.raises(MultitokenError, match=r"98 tokens \+ 30 new tokens \+ 3 drafted"):
        generate(model, [prompt], max_new_tokens=30, tree="chain", draft_len=3)
    edge = generate(model, [prompt], max_new_tokens=27, tree="chain", draft_len=3)
    assert edge.tokens[0] == plain.tokens[0][:27]  # the last verify pass reaches position 127
    with pytest.raises(MultitokenError, match=r"98 tokens \+ 31 new tokens exceeds"):
        generate(model, [prompt], max_new_tokens=31, speculate=False)


def test_sampling_without_a_seed_draws_a_fresh_one_and_reports_it():
    """The reported seed repeats the run where the drafts are fixed (a chain of 2 here): the
    automatic modes choose drafts by timing, and the text sampled depends on the drafts too
    (its law does not)."""
    model = model_of("bpd", depth=2)
    options = dict(max_new_tokens=24, temperature=1.0, tree="chain", draft_len=2)
    a, b = generate(model, [[5, 6, 7]], **options), generate(model, [[5, 6, 7]], **options)
    assert a.stats.seed is not None and a.stats.seed != b.stats.seed
    assert a.tokens != b.tokens  # 24 tokens drawn from a near-uniform law over 64
    again = generate(model, [[5, 6, 7]], seed=a.stats.seed, **options)
    assert again.tokens == a.tokens and again.stats.to_dict()["seed"] == a.stats.seed
    assert generate(model, [[5, 6, 7]], max_new_tokens=4).stats.seed is None  # greedy: none
