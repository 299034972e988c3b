"""Decoding: the trunk alone (method 1) or self-speculative decoding with the MTP heads (method 2).

One step of method 2 (shared/DESIGN.md §Inference), as a ladder of small functions:

    draft   the heads propose d_1..d_K from each row's newest committed position
    verify  one trunk pass over [pending, d_1..d_K] gives the trunk's own choices g_1..g_{K+1}
    accept  each row keeps its longest correct prefix d_1..d_m and the bonus g_{m+1}
    commit  every KV cache keeps exactly the accepted prefix (``RaggedCache``: rows of a batch
            may accept different numbers of tokens in the same step)

State is passed explicitly: the trunk's cache, the heads' draft state, the committed tokens.
Greedy output is token-for-token the trunk's own greedy output; sampled output follows the
trunk's distribution exactly (speculative sampling, ``multitoken.sampling``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from multitoken.config import GenerateConfig
from multitoken.errors import MultitokenError
from multitoken.kvcache import RaggedCache, prefix_mask
from multitoken.model import MTPModel
from multitoken.sampling import (
    Sampling,
    accept_greedy,
    accept_sampled,
    accept_typical,
    choose,
    probs,
)
from multitoken.trunk import watch_states

log = logging.getLogger("multitoken")


@dataclass
class Committed:
    """What the heads draft from. Row r has ``lengths[r]`` committed tokens (the last is the
    trunk's pending token, not yet through the trunk) and ``new[r]`` newly trunk-processed
    positions ``start[r] .. start[r] + new[r] - 1`` whose states are in ``hidden``/``branch``."""

    tokens: list[torch.Tensor]  # per row [N_r]
    hidden: torch.Tensor  # [B, n, d] h^0 of the new positions (a prefix of new[r] per row)
    branch: torch.Tensor | None  # [B, n, d] stream entering the branch layer (meta)
    start: list[int]
    new: list[int]


@dataclass
class Stats:
    """Per call: trunk passes, tokens emitted, τ = tokens per trunk pass, per-draft-position
    acceptance a_k = P(d_k accepted | d_1..d_{k-1} accepted), wall time, tokens/s. Passes and
    tokens are summed over rows, so τ is the mean tokens per pass of one row."""

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


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt
    stats: Stats


# ---------------------------------------------------------------------------------------------
# The trunk
# ---------------------------------------------------------------------------------------------


def trunk_pass(
    model: MTPModel, ids: torch.Tensor, positions: torch.Tensor, kv: RaggedCache, seen: dict
):
    """Run ``ids`` [B, q] at ``positions`` [B, q] on top of ``kv``: logits [B, q, V], h^0 and
    (meta) the stream entering the branch layer, [B, q, d] each, as recorded into ``seen`` by
    :func:`multitoken.trunk.watch_states`. ``kv.commit`` must follow."""
    logits = model.trunk(
        input_ids=ids,
        attention_mask=kv.padding_mask(ids.size(1)),
        position_ids=positions,
        cache=kv.cache,
        use_cache=True,
    ).logits
    return logits, seen["hidden"], seen.get("branch")


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _decode_loop(
    model: MTPModel,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    K: int,
    sampling: Sampling,
    gen: torch.Generator | None,
    eos: int | Iterable[int] | None,
    on_tokens: Callable[[int, list[int]], None] | None,
    seen: dict,
) -> Generation:
    device = model.parts.embed.weight.device
    B = len(prompts)
    speculate = cfg.speculate
    tried = K if speculate else 0  # plain decoding reports no acceptance at all
    stats = Stats(head_tries=[0] * tried, head_hits=[0] * tried)
    kv = RaggedCache(B, device, model.trunk.config)

    # prefill, right-padded: causal attention keeps each row's tokens from seeing its padding
    P = max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(P, device=device).expand(B, P)
    logits, hidden, stream = trunk_pass(model, ids, positions, kv, seen)
    lengths = [len(p) for p in prompts]
    kv.commit(prefix_mask(lengths, P, device))
    last = logits[torch.arange(B), torch.tensor(lengths, device=device) - 1]  # [B, V]
    pending, _ = choose(last, sampling, gen)
    tokens = [torch.cat([ids[r, : lengths[r]], pending[r : r + 1]]) for r in range(B)]
    out: list[list[int]] = [[int(pending[r])] for r in range(B)]
    active = [True] * B
    stats.trunk_passes += B
    step = Committed(tokens, hidden, stream, [0] * B, lengths)
    draft_state = model.heads.new_draft_state(B) if speculate else None

    stop = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
    ended = [int(pending[r]) in stop for r in range(B)]  # the row wrote a stop token

    def finished(r: int) -> bool:
        return ended[r] or len(out[r]) >= cfg.max_new_tokens

    for r in range(B):
        active[r] = not finished(r)
        if on_tokens:
            on_tokens(r, out[r])
    while any(active):
        n = [t.numel() for t in tokens]  # committed per row; the last is pending
        q = K + 1 if speculate else 1
        if speculate:  # draft
            drafts, q_draft = model.heads.draft(
                draft_state, step, K, lambda lg: choose(lg, sampling, gen)
            )
            ids = torch.cat([torch.stack([t[-1] for t in tokens]).unsqueeze(1), drafts], dim=1)
        else:
            ids = torch.stack([t[-1] for t in tokens]).unsqueeze(1)
        positions = torch.tensor(n, device=device)[:, None] - 1 + torch.arange(q, device=device)
        logits, hidden, stream = trunk_pass(model, ids, positions, kv, seen)  # verify
        accepted_counts = []
        for r in range(B):  # accept
            if not active[r]:  # a finished row stays where it is: it keeps no new slot
                accepted_counts.append(0)
                continue
            if not speculate:
                m, nxt = 0, int(choose(logits[r, :1], sampling, gen)[0])
            elif sampling.greedy:
                m, nxt = accept_greedy(drafts[r], logits[r].argmax(-1))
            elif cfg.typical > 0:
                m, nxt = accept_typical(drafts[r], probs(logits[r], sampling), cfg.typical, gen)
            else:
                m, nxt = accept_sampled(drafts[r], q_draft[r], probs(logits[r], sampling), gen)
            accepted_counts.append(m + 1)
            new = torch.cat([ids[r, 1 : m + 1], torch.tensor([nxt], device=device)])
            tokens[r] = torch.cat([tokens[r], new])
            stats.trunk_passes += 1
            for j in range(min(m + 1, tried)):
                stats.head_tries[j] += 1
                stats.head_hits[j] += int(j < m)
            room = cfg.max_new_tokens - len(out[r])
            fresh = new.tolist()[:room]
            cut = next((i for i, t in enumerate(fresh) if t in stop), None)
            if cut is not None:
                fresh, ended[r] = fresh[: cut + 1], True
            out[r].extend(fresh)
            if on_tokens and fresh:
                on_tokens(r, fresh)
            active[r] = not finished(r)
        kv.commit(prefix_mask(accepted_counts, q, device))  # commit / roll back
        width = max(accepted_counts)
        step = Committed(
            tokens,
            hidden[:, :width],
            stream[:, :width] if stream is not None else None,
            [x - 1 for x in n],
            accepted_counts,
        )
    stats.tokens = sum(len(o) for o in out)
    return Generation(out, stats)


def generate(
    model: MTPModel,
    prompts: list[list[int]],
    config: GenerateConfig | None = None,
    eos_id: int | Iterable[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    **options,
) -> Generation:
    """Decode a batch of ``prompts`` (token ids, any lengths) together; a row ends at its
    ``max_new_tokens`` or at a stop token ``eos_id`` (one id, or several: chat models end a turn
    with a token of their own), which is kept as the row's last token.

    Options are the fields of :class:`GenerateConfig` (``max_new_tokens``, ``draft_len``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``, ``speculate``). ``draft_len`` K defaults to
    the heads' depth D; K > D is allowed for the DeepSeek family only (its last module is reused
    recurrently). ``on_tokens(row, tokens)`` is called as tokens are accepted (streaming)."""
    cfg = dataclasses.replace(config or GenerateConfig(), **options)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.speculate and model.heads is None:
        log.warning("this checkpoint has no MTP heads: decoding with the trunk alone")
        cfg = dataclasses.replace(cfg, speculate=False)
    if cfg.typical < 0 or cfg.typical >= 1:
        raise MultitokenError(f"must be in [0, 1), got {cfg.typical}", "--typical")
    if cfg.typical > 0 and cfg.speculate:
        if sampling.greedy:
            raise MultitokenError("typical acceptance samples: give --temperature > 0", "--typical")
        log.warning(
            "typical acceptance is lossy: the output no longer follows the trunk's "
            "distribution exactly"
        )
    K = (model.depth or 1) if cfg.draft_len is None else cfg.draft_len
    if K < 1:
        raise MultitokenError(f"must be >= 1, got {K}", "--draft-len")
    if cfg.speculate and K > model.depth and model.family != "deepseek":
        raise MultitokenError(
            f"{model.family} heads draft at most D = {model.depth} tokens; got {K}", "--draft-len"
        )
    if cfg.max_new_tokens < 1:
        raise MultitokenError(f"must be >= 1, got {cfg.max_new_tokens}", "--max-new-tokens")
    if not prompts:
        raise MultitokenError("no prompts", "--prompt")
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
    t0 = time.perf_counter()
    window = _sliding_window(model.trunk.config)
    longest = max(map(len, prompts)) + cfg.max_new_tokens + K + 1
    branch = model.heads.branch_layer if (cfg.speculate and model.family == "meta") else None
    with watch_states(model.parts, branch) as seen:  # one set of hooks for the whole call
        if len(prompts) > 1 and window is not None and longest > window:
            # Rows of a RaggedCache have holes, and a sliding-window mask counts cache slots, not
            # positions: past the window a batch would hide keys a row should see. One row at a
            # time has no holes, so it is exact.
            rows = [
                _decode_loop(
                    model, [p], cfg, K, sampling, gen, eos_id, _for_row(on_tokens, r), seen
                )
                for r, p in enumerate(prompts)
            ]
            tokens = [g.tokens[0] for g in rows]
            result = Generation(tokens, _sum_stats([g.stats for g in rows]))
        else:
            result = _decode_loop(model, prompts, cfg, K, sampling, gen, eos_id, on_tokens, seen)
    result.stats.wall_s = time.perf_counter() - t0
    return result


def _sliding_window(config) -> int | None:
    """The trunk's attention window where some layer uses one (Mistral, Qwen, Gemma...)."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or (types is not None and "sliding_attention" not in types):
        return None
    return window


def _for_row(on_tokens, row: int):
    return None if on_tokens is None else (lambda _r, tokens: on_tokens(row, tokens))


def _sum_stats(parts: list[Stats]) -> Stats:
    return Stats(
        trunk_passes=sum(s.trunk_passes for s in parts),
        tokens=sum(s.tokens for s in parts),
        head_tries=[sum(t) for t in zip(*(s.head_tries for s in parts))],
        head_hits=[sum(h) for h in zip(*(s.head_hits for s in parts))],
    )
