"""Decoding: the trunk alone (method 1) or self-speculative decoding with the MTP heads (method 2).

One step of method 2 (shared/DESIGN.md §Inference), as a ladder of small functions:

    draft   the heads propose d_1..d_K from the newest committed position
    verify  one trunk pass over [pending, d_1..d_K] gives the trunk's own choices g_1..g_{K+1}
    accept  keep the longest correct prefix d_1..d_m and the bonus g_{m+1}
    commit  roll the trunk's KV cache back to exactly the accepted prefix; the heads' caches only
            ever hold committed positions (or are cropped back to them inside ``draft``)

State is passed explicitly: the trunk's ``DynamicCache``, the heads' draft state, the committed
tokens. Greedy output is token-for-token the trunk's own greedy output; sampled output follows the
trunk's distribution exactly (speculative sampling, ``multitoken.sampling``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from multitoken.config import GenerateConfig
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.sampling import Sampling, accept_greedy, accept_sampled, choose, probs
from multitoken.trunk import crop_cache, layer_arguments


@dataclass
class Committed:
    """What the heads may draft from: all committed tokens (the last one is the trunk's pending
    token, not yet through the trunk) and the trunk's states at the newly processed positions."""

    tokens: torch.Tensor  # [1, N]
    hidden: torch.Tensor  # [1, n, d] h^0 at positions start .. N-2
    branch: torch.Tensor | None  # [1, n, d] stream entering the branch layer (meta)
    start: int


@dataclass
class Stats:
    """Per call: trunk passes, tokens emitted, τ = tokens per trunk pass, per-head acceptance
    a_k = P(d_k accepted | d_1..d_{k-1} accepted), wall time, tokens/s."""

    trunk_passes: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    head_tries: list[int] = field(default_factory=list)
    head_hits: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.trunk_passes)

    @property
    def acceptance(self) -> list[float]:
        return [h / t if t else 0.0 for h, t in zip(self.head_hits, self.head_tries)]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "trunk_passes": self.trunk_passes,
            "tokens": self.tokens,
            "tau": self.tau,
            "acceptance": self.acceptance,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
        }

    def merge(self, other: Stats) -> None:
        self.trunk_passes += other.trunk_passes
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        n = max(len(self.head_tries), len(other.head_tries))
        self.head_tries = _add(self.head_tries, other.head_tries, n)
        self.head_hits = _add(self.head_hits, other.head_hits, n)


def _add(a: list[int], b: list[int], n: int) -> list[int]:
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt
    stats: Stats


# ---------------------------------------------------------------------------------------------
# The trunk
# ---------------------------------------------------------------------------------------------


def trunk_pass(model: MTPModel, ids: torch.Tensor, cache: DynamicCache, branch: int | None):
    """Extend the trunk's cache by ``ids`` [1, q]: logits [q, V], h^0 [1, q, d], branch stream."""
    seen: dict[str, torch.Tensor] = {}
    parts = model.parts
    final = (
        parts.layers[-1] if isinstance(parts.final_norm, torch.nn.Identity) else parts.final_norm
    )
    hooks = [
        final.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out)
        )
    ]
    if branch is not None:
        hooks.append(
            parts.layers[branch].register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("b", layer_arguments(m, a, kw)[0]),
                with_kwargs=True,
            )
        )
    try:
        logits = model.trunk(input_ids=ids, cache=cache, use_cache=True).logits
    finally:
        for h in hooks:
            h.remove()
    return logits[0], seen["h"], seen.get("b")


# ---------------------------------------------------------------------------------------------
# One sequence
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _generate_one(
    model: MTPModel,
    prompt: list[int],
    max_new: int,
    K: int,
    speculate: bool,
    sampling: Sampling,
    gen: torch.Generator | None,
    eos: int | None,
):
    stats = Stats(head_tries=[0] * K, head_hits=[0] * K)
    device = model.parts.embed.weight.device
    branch = model.heads.branch_layer if (speculate and model.family == "meta") else None
    cache = DynamicCache(config=model.trunk.config)
    ids = torch.tensor([prompt], device=device)
    logits, hidden, stream = trunk_pass(model, ids, cache, branch)
    stats.trunk_passes += 1
    pending, _ = choose(logits[-1:], sampling, gen)
    out = [int(pending)]
    tokens = torch.cat([ids[0], pending])
    draft_state = model.heads.new_draft_state() if speculate else None
    start = 0

    def pick(lg):
        return choose(lg, sampling, gen)

    while len(out) < max_new and (eos is None or out[-1] != eos):
        n = tokens.numel()  # committed; the last is pending
        if not speculate:
            logits, _, _ = trunk_pass(model, tokens[-1:].unsqueeze(0), cache, None)
            stats.trunk_passes += 1
            nxt, _ = choose(logits, sampling, gen)
            out.append(int(nxt))
            tokens = torch.cat([tokens, nxt])
            continue
        # draft
        step = Committed(tokens.unsqueeze(0), hidden, stream, start)
        drafts, q = model.heads.draft(draft_state, step, K, pick)
        # verify
        logits, hidden, stream = trunk_pass(
            model, torch.cat([tokens[-1:], drafts]).unsqueeze(0), cache, branch
        )
        stats.trunk_passes += 1
        # accept
        if sampling.greedy:
            m, bonus = accept_greedy(drafts, logits.argmax(-1))
        else:
            m, bonus = accept_sampled(drafts, q, probs(logits, sampling), gen)
        for j in range(min(m + 1, K)):
            stats.head_tries[j] += 1
            stats.head_hits[j] += int(j < m)
        # commit: the trunk keeps pending + d_1..d_m; the heads see their states
        crop_cache(cache, n + m)
        hidden = hidden[:, : m + 1]
        stream = stream[:, : m + 1] if stream is not None else None
        start = n - 1
        accepted = torch.cat([drafts[:m], torch.tensor([bonus], device=device)])
        out.extend(accepted.tolist())
        tokens = torch.cat([tokens, accepted])
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    out = out[:max_new]
    stats.tokens = len(out)
    return out, stats


def generate(
    model: MTPModel,
    prompts: list[list[int]],
    config: GenerateConfig | None = None,
    eos_id: int | None = None,
    **options,
) -> Generation:
    """Decode ``prompts`` (token ids). Options are the fields of :class:`GenerateConfig`
    (``max_new_tokens``, ``draft_len``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
    ``speculate``). ``draft_len`` K defaults to the heads' depth D; K > D is allowed for the
    DeepSeek family only (its last module is reused recurrently)."""
    cfg = dataclasses.replace(config or GenerateConfig(), **options)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    K = model.depth if cfg.draft_len is None else cfg.draft_len
    if K < 1:
        raise MultitokenError(f"must be >= 1, got {K}", "--draft-len")
    if cfg.speculate and K > model.depth and model.family != "deepseek":
        raise MultitokenError(
            f"{model.family} heads draft at most D = {model.depth} tokens; got {K}", "--draft-len"
        )
    if cfg.max_new_tokens < 1:
        raise MultitokenError(f"must be >= 1, got {cfg.max_new_tokens}", "--max-new-tokens")
    limit = getattr(model.trunk.config, "max_position_embeddings", None)
    for p in prompts:
        if not p:
            raise MultitokenError("the prompt is empty", "--prompt")
        if limit and len(p) + cfg.max_new_tokens + K + 1 > limit:
            raise MultitokenError(
                f"prompt of {len(p)} tokens + {cfg.max_new_tokens} new tokens exceeds the "
                f"context window of {limit}",
                "--prompt",
            )
    gen = None
    if not sampling.greedy:
        gen = torch.Generator(device=model.parts.embed.weight.device)
        gen.manual_seed(0 if cfg.seed is None else cfg.seed)
    total = Stats(head_tries=[0] * K, head_hits=[0] * K)
    results = []
    t0 = time.perf_counter()
    for prompt in prompts:
        out, stats = _generate_one(
            model, prompt, cfg.max_new_tokens, K, cfg.speculate, sampling, gen, eos_id
        )
        results.append(out)
        total.merge(stats)
    total.wall_s = time.perf_counter() - t0
    return Generation(results, total)
