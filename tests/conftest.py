"""Shared fixtures and helpers of the test suite: tiny trunks, models with heads (the trained
ones cached for the session by the ``trained`` fixture), the references decoding is checked
against, and the statistics sampling is judged by. Test modules import from here, never from
one another."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, MistralConfig

from multitoken.config import HeadConfig
from multitoken.decode.api import generate
from multitoken.decode.costs import CostModel
from multitoken.decode.sampling import Sampling, probs
from multitoken.heads import Committed, HeadInputs, MTPHeads
from multitoken.model import MTPModel

VOCAB = 64

# ------------------------------------------------------------------------------------------------
# Tiny trunks
# ------------------------------------------------------------------------------------------------


def micro_llama(
    seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB, attn: str = "eager"
):
    """A Llama trunk small enough for exact, fast unit tests (fp32, eager attention unless
    ``attn`` names another implementation: real checkpoints load with sdpa)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def windowed(config_class, window: int, **extra):
    """A tiny trunk of ``config_class`` with a sliding ``window`` (eager attention)."""
    torch.manual_seed(0)
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        max_position_embeddings=256,
        **extra,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def mistral(window: int):
    """A tiny Mistral trunk attending over the last ``window`` tokens only."""
    return windowed(MistralConfig, window)


def micro_deepseek(layers: int = 2, dense: int = 1, seed: int = 0):
    """A DeepSeek-V3 trunk (MLA attention, MoE after ``dense`` dense layers), fp32, eager."""
    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=dense,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 13), generator=g)


# ------------------------------------------------------------------------------------------------
# Models with heads: fresh, perturbed, far from their trunk, trained
# ------------------------------------------------------------------------------------------------


def model_of(
    family: str, depth: int = 4, seed: int = 0, vocab: int = 64, attn: str = "eager"
) -> MTPModel:
    trunk = micro_llama(seed=seed, vocab=vocab, attn=attn)
    return MTPModel(trunk, HeadConfig(family=family, depth=depth)).eval()


def perturb_heads(model, seed: int = 0, scale: float = 0.05):
    """Move every head weight off its initial value (a fresh BPD head is the identity on the
    trunk, fresh norms are all ones), as training would; returns the model, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def far_from_a_sharp_trunk(model, sharpness: float):
    """Heads moved far from the trunk (unit noise on every weight) and the trunk's logits scaled
    by ``sharpness`` (peaked, non-uniform laws): drafts get rejected and residuals sampled, what
    sampling tests must exercise. Draws from torch's global generator; returns the model."""
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p))
        model.trunk.lm_head.weight.mul_(sharpness)
    return model


def far_heads(family: str) -> MTPModel:
    """D = 2 heads far from a sharp 4-token trunk: rejections and residuals are exercised."""
    torch.manual_seed(0)
    return far_from_a_sharp_trunk(model_of(family, depth=2, vocab=4), 4.0)


def _train_heads(family: str, window: int | None) -> MTPModel:
    """A micro trunk (D = 3) whose heads learnt its own greedy continuations for a few dozen
    steps: drafts are accepted often, and rows of a batch accept different counts — what
    lossless decoding must survive (fresh heads are almost never accepted). ``window``: a
    Mistral trunk attending over that many positions instead of the Llama one."""
    model = model_of(family, depth=3)
    if window is not None:
        model = MTPModel(mistral(window), HeadConfig(family=family, depth=3)).eval()
    model.trunk.requires_grad_(False)
    prompts = torch.randint(3, 64, (24, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = model.trunk.generate(prompts, max_new_tokens=40, do_sample=False, pad_token_id=0)
    opt = torch.optim.Adam(model.heads.parameters(), lr=3e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(text, lam=1.0).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained():
    """``trained(family, window=None)``: the model :func:`_train_heads` gives, trained once per
    session (per xdist worker) and shared by every test that asks for the same one — a test
    that swaps its heads or changes it otherwise must put it back."""
    cache: dict[tuple[str, int | None], MTPModel] = {}

    def get(family: str, window: int | None = None) -> MTPModel:
        if (family, window) not in cache:
            cache[family, window] = _train_heads(family, window)
        return cache[family, window]

    return get


# ------------------------------------------------------------------------------------------------
# Decoding references: prompts, transformers' greedy output, stub and checking heads, costs
# ------------------------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def hf_greedy(model: MTPModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (``n`` tokens) of ``prompt`` by the model's trunk."""
    out = model.trunk.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


class OracleHeads(MTPHeads):
    """Stub heads drafting the trunk's own greedy continuation (``wrong``: always a wrong one)."""

    def __init__(self, model: MTPModel, wrong: bool) -> None:
        super().__init__()
        self.model, self.wrong, self.depth = model, wrong, model.depth

    def new_draft_state(self, batch):
        return None

    def draft(self, _state, step, K, sample):
        rows = []
        for ids in step.tokens:
            with torch.no_grad():
                out = self.model.trunk.generate(
                    ids[None], max_new_tokens=K, do_sample=False, pad_token_id=0
                )
            rows.append(out[0, ids.numel() :])
        cont = torch.stack(rows)
        if self.wrong:
            cont = (cont + 1) % self.model.trunk.config.vocab_size
        return cont, None


def teacher_forced_drafts(model: MTPModel, tokens: torch.Tensor, drafts: torch.Tensor) -> list:
    """docs/design.md's definition, recomputed from scratch without any cache: draft k is the argmax
    of the teacher-forced forward over x_0..x_{N-1}, d_1..d_{k-1} read at module k's last
    position (for meta/bpd: every head at the newest trunk position)."""
    N = tokens.size(1)
    out = []
    for k in range(1, drafts.numel() + 1):
        seq = torch.cat([tokens[0], drafts[: k - 1]]).unsqueeze(0)  # [1, N + k - 1]
        t = model.trunk_forward(
            seq[:, : N - 1], model.heads.branch_layer if model.family == "meta" else None
        )
        if model.family == "deepseek":
            h = t.hidden
            for j in range(1, k + 1):
                ahead = seq[:, j : j + h.size(1)]
                h = h[:, : ahead.size(1)]
                pos = torch.arange(h.size(1)).unsqueeze(0)
                mod = model.heads.mtp[min(j, model.depth) - 1]
                h = mod(h, model.parts.embed(ahead), model.parts.block_kwargs(h, pos))
            logits = model.heads.out_head(min(k, model.depth) - 1, h[:, N - 2])
        elif model.family == "meta":
            logits = model.heads.head_logits(k - 1, t.branch_hidden, t.block_kwargs)[:, N - 2]
        else:
            logits = model.heads(t.hidden)[k - 1][:, N - 2]
        out.append(int(logits.argmax(-1)))
    return out


class CheckedHeads(torch.nn.Module):
    """Wraps real heads: every incremental (cached) draft is checked against recomputation."""

    def __init__(self, model: MTPModel) -> None:
        super().__init__()
        self.model, self.inner = model, model.heads
        self.checked = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def draft(self, state, step, K, sample):
        drafts, q = self.inner.draft(state, step, K, sample)
        model = self.model
        model.heads = self.inner
        try:
            for tokens, row, new in zip(step.tokens, drafts, step.new):
                if new:  # a row that has finished commits nothing and its drafts are unused
                    assert row.tolist() == teacher_forced_drafts(model, tokens[None], row)
        finally:
            model.heads = self
        self.checked += 1
        return drafts, q


def costs(c: list[float], draft: float = 0.0) -> CostModel:
    """A cost model that learns nothing: c(q) in units of a one-second plain step, drafting at
    ``draft`` of a plain step (the test, not the machine, decides the trees)."""
    return CostModel(c, t1_s=1.0, prior_draft=draft, learn_draft=False)


# ------------------------------------------------------------------------------------------------
# Sampling: the trunk's laws, and the tests samples are judged by
# ------------------------------------------------------------------------------------------------


def two_token_law(trunk, prompt: list[int], vocab: int) -> torch.Tensor:
    """[vocab * vocab] the trunk's joint law of the first two sampled tokens at temperature 1:
    p(x1) p(x2 | x1), flattened as x1 * vocab + x2."""
    sampling = Sampling(temperature=1.0)
    with torch.no_grad():
        first = probs(trunk(torch.tensor([prompt])).logits[0, -1], sampling)
        second = torch.stack(
            [
                probs(trunk(torch.tensor([prompt + [t]])).logits[0, -1], sampling)
                for t in range(vocab)
            ]
        )
    return (first[:, None] * second).flatten()


def three_token_law(trunk, prompt: list[int], vocab: int, sampling) -> torch.Tensor:
    """[vocab ** 3] the trunk's joint law of the first three sampled tokens under ``sampling``
    (temperature, top-k, top-p): p(x1) p(x2 | x1) p(x3 | x1, x2), flattened as
    (x1 * vocab + x2) * vocab + x3. With K = 2, x2 is the first draft's position and x3 the
    second draft's or the bonus token: both speculative positions are covered."""

    def law(ids: list[int]) -> torch.Tensor:
        return probs(trunk(torch.tensor([ids])).logits[0, -1], sampling)

    with torch.no_grad():
        first = law(prompt)
        out = torch.zeros(vocab, vocab, vocab)
        for a in range(vocab):
            second = law(prompt + [a])
            for b in range(vocab):
                out[a, b] = first[a] * second[b] * law(prompt + [a, b])
    return out.flatten()


def three_token_counts(outputs: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab**3)
    for toks in outputs:
        counts[(toks[0] * vocab + toks[1]) * vocab + toks[2]] += 1
    return counts


def two_token_counts(outputs: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab * vocab)
    for toks in outputs:
        counts[toks[0] * vocab + toks[1]] += 1
    return counts


def assert_chi_square_fits(counts: torch.Tensor, expected: torch.Tensor) -> None:
    """Pearson's chi-square of ``counts`` against the law ``expected`` (summing to 1) at the
    0.999 quantile (Wilson-Hilferty), so a correct sampler fails 1 time in 1000.

    A sample where the law puts no mass fails outright. Cells expected fewer than 5 times are
    pooled into one (into the smallest other cell while the pool itself is expected fewer than
    5 times), not dropped: mass a wrong sampler moves into the law's thin tail still counts."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    assert abs(float(expected.sum()) - 1) < 1e-6, f"the law sums to {float(expected.sum())}"
    impossible = expected <= 0
    strays = int(counts[impossible].sum())
    assert strays == 0, f"{strays} samples where the law puts no mass"
    n = float(counts.sum())
    big = expected * n >= 5
    o, e = list(counts[big].tolist()), list((expected[big] * n).tolist())
    pool_o, pool_e = float(counts[~big].sum()), float(expected[~big].sum()) * n
    if pool_e > 0:
        if pool_e >= 5 or not e:
            o, e = o + [pool_o], e + [pool_e]
        else:
            i = min(range(len(e)), key=e.__getitem__)
            o[i], e[i] = o[i] + pool_o, e[i] + pool_e
    chi2 = sum((oi - ei) ** 2 / ei for oi, ei in zip(o, e))
    dof = len(e) - 1
    assert dof >= 1, "the law has a single cell: nothing to test"
    z = 3.090
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < critical, (chi2, critical, dof)


def sample_the_trunks_law(model: MTPModel, **options):
    """2,500 samples of the first three tokens after one prompt, checked against the trunk's
    own law by a chi-square test; returns the generation."""
    prompt = [1, 2, 3]
    expected = three_token_law(model.trunk, prompt, 4, Sampling(temperature=1.0))
    out = generate(model, [prompt] * 2500, max_new_tokens=3, temperature=1.0, **options)
    assert_chi_square_fits(three_token_counts(out.tokens, 4), expected)
    return out


# the probability bins of assert_calibrated: the first catches tokens the law gives no mass
CALIBRATION_EDGES = [1e-12, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9]


def assert_calibrated(trunk, prompts, outputs, sampling, skip: int = 0) -> int:
    """Every sampled token past the first ``skip`` of its row, judged by the trunk's own law
    p_t (after temperature, top-k, top-p) at its position, teacher-forced on what the row
    emitted: the number of tokens whose p_t(x_t) falls in each bin of CALIBRATION_EDGES must be
    what the laws expect, Σ_t p_t(bin), within 4.5 standard deviations (Σ_t π(1 − π), the
    positions being independent draws); and no token may be one p_t gives no mass. Positions
    deep in a row have prefixes no other row shares, so this is how later steps (after
    compaction, rows retiring, learnt rates) are checked. Returns the tokens judged."""
    edges = torch.tensor(CALIBRATION_EDGES, dtype=torch.float64)
    bins = len(CALIBRATION_EDGES) + 1
    seen, mass, var = (torch.zeros(bins, dtype=torch.float64) for _ in range(3))
    judged = 0
    for prompt, out in zip(prompts, outputs):
        if len(out) <= skip:
            continue
        ids = torch.tensor([list(prompt) + list(out)])
        with torch.no_grad():
            logits = trunk(ids).logits[0, len(prompt) - 1 : ids.size(1) - 1]  # [n, V]
        p = probs(logits, sampling).double()[skip:]  # [n', V]
        x = torch.tensor(out[skip:])
        px = p.gather(1, x[:, None]).squeeze(1)
        assert bool((px > 0).all()), "a token sampled where the trunk's law puts no mass"
        seen += torch.bincount(torch.bucketize(px, edges), minlength=bins).double()
        per_bin = torch.zeros(p.size(0), bins, dtype=torch.float64)
        per_bin.scatter_add_(1, torch.bucketize(p, edges), p)  # [n', bins] π_t(bin)
        mass += per_bin.sum(0)
        var += (per_bin * (1 - per_bin)).sum(0)
        judged += p.size(0)
    z = (seen - mass) / var.sqrt().clamp_min(1e-9)
    assert float(z[1:].abs().max()) < 4.5, (
        f"tokens per bin {seen.tolist()}, expected {mass.tolist()}"
    )
    return judged


# ------------------------------------------------------------------------------------------------
# Drafting driven without the decoder (tests/heads/test_drafting.py, tests/architectures.py)
# ------------------------------------------------------------------------------------------------


def argmax(logits: torch.Tensor):
    return logits.argmax(-1), None


def committed(model: MTPModel, tokens: list[torch.Tensor], start: list[int]) -> Committed:
    """Row r's positions start[r] .. N_r - 2 (the last token is pending), their states from a
    fresh trunk forward over the row alone, right-padded into [B, n, d]."""
    hidden, branch = [], []
    for ids, s in zip(tokens, start):
        out = model.trunk_forward(ids[None, :-1], model.heads.branch_layer)
        hidden.append(out.hidden[0, s:])
        branch.append(None if out.branch_hidden is None else out.branch_hidden[0, s:])
    pad = torch.nn.utils.rnn.pad_sequence
    return Committed(
        tokens=list(tokens),
        hidden=pad(hidden, batch_first=True),
        branch=None if branch[0] is None else pad(branch, batch_first=True),
        start=list(start),
        new=[h.size(0) for h in hidden],
    )


def teacher_forced(model: MTPModel, ids: torch.Tensor, drafts: list[int]) -> list[int]:
    """Draft k as training defines it: the argmax of head k's teacher-forced logits at the
    newest trunk position N-2, over x_0..x_{N-1}, d_1..d_{k-1}."""
    return [
        int(teacher_forced_logits(model, ids, drafts[: k - 1]).argmax())
        for k in range(1, len(drafts) + 1)
    ]


def teacher_forced_logits(model: MTPModel, ids: torch.Tensor, path: list[int]) -> torch.Tensor:
    """Head k = len(path) + 1's teacher-forced logits [V] at the newest trunk position N-2 over
    x_0..x_{N-1} followed by the drafts ``path``."""
    N, k = ids.numel(), len(path) + 1
    seq = torch.cat([ids, torch.tensor(path, dtype=ids.dtype)])[None]
    t = model.trunk_forward(seq[:, : N - 1], model.heads.branch_layer)
    inputs = HeadInputs(
        tokens=seq, hidden=t.hidden, branch=t.branch_hidden, block_kwargs=t.block_kwargs
    )
    return model.heads.training_logits(inputs)[k - 1][0, N - 2]
