"""Decoding: the trunk alone (method 1) or self-speculative decoding with the MTP heads (method 2).

A call is a ladder of small functions over one explicit state (:class:`Decoding`):

    prefill  one trunk pass over the prompts; logits only at each row's last position
    draft    the heads propose d_1..d_K from what the trunk has committed (K = 0: a plain step)
    verify   one trunk pass over [pending, d_1..d_K] gives the trunk's own choices g_1..g_{K+1}
    accept   each row keeps its longest correct prefix d_1..d_m and the bonus g_{m+1}
    commit   every KV cache keeps exactly the accepted prefix (``RaggedCache``: rows of a batch
             may accept different numbers of tokens in the same step); the tokens join the rows

K is fixed (``--draft-len 3``) or chosen before each step (``--draft-len auto``,
:mod:`multitoken.costs`) from the measured verify cost c(q), the measured drafting cost and
the live per-position acceptance. Whatever K each step uses, a step is a correct speculative
step, so greedy output is token-for-token the trunk's own greedy output and sampled output
follows the trunk's distribution exactly (speculative sampling, ``multitoken.sampling``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from multitoken.config import GenerateConfig, draft_len_value
from multitoken.costs import CostModel, DraftLen, Stopwatch, cost_model
from multitoken.errors import MultitokenError
from multitoken.heads.base import Committed
from multitoken.kernels import choose_linear_kernel, linear_kernels
from multitoken.kvcache import RaggedCache, unrollable_layers
from multitoken.model import MTPModel
from multitoken.sampling import (
    Sampling,
    accept_greedy_rows,
    accept_sampled,
    accept_typical,
    choose,
    probs,
)
from multitoken.trunk import watch_states

log = logging.getLogger("multitoken")


@dataclass
class Stats:
    """Per call: trunk passes, tokens emitted, τ = tokens per trunk pass, per-draft-position
    acceptance a_k = P(d_k accepted | d_1..d_{k-1} accepted), the K each step drafted
    (``draft_lens``; one K for all rows of a batch), the time spent drafting, wall time,
    tokens/s. Passes and tokens are summed over rows, so τ is the mean tokens per pass of one
    row."""

    trunk_passes: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    head_tries: list[int] = field(default_factory=list)
    head_hits: list[int] = field(default_factory=list)
    draft_lens: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # seconds in the heads' draft calls
    draft_steps: int = 0  # steps that drafted (K > 0)

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
            "draft_lens": self.draft_lens,
            "draft_s": self.draft_s,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt
    stats: Stats


@dataclass
class Decoding:
    """The state one call carries from rung to rung (nothing is kept on the model)."""

    kv: RaggedCache  # the trunk's cache
    tokens: torch.Tensor  # [B, capacity]: row r's committed tokens are tokens[r, :length[r]]
    length: list[int]  # committed tokens per row; the last one is pending
    pending: torch.Tensor  # [B] each row's pending token (the trunk's latest choice)
    unseen: list[Committed]  # trunk states the heads have not drafted from yet, oldest first
    heads: object  # the heads' draft state (None for heads that keep none)
    out: list[list[int]]  # the new tokens of each row, as the caller gets them
    done: list[bool]  # the row reached max_new_tokens or wrote a stop token


# ---------------------------------------------------------------------------------------------
# The trunk
# ---------------------------------------------------------------------------------------------


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def trunk_pass(
    model: MTPModel,
    ids: torch.Tensor,
    kv: RaggedCache,
    start: list[int],
    seen: dict,
    keep: int | list[int],
):
    """Run ``ids`` [B, q] on top of ``kv``, row r's first token at position ``start[r]``:
    logits, and h^0 and (meta) the stream entering the branch layer, [B, q, d] each, as
    :func:`multitoken.trunk.watch_states` recorded them into ``seen`` (None outside it).

    ``keep``: logits of the last ``keep`` positions [B, keep, V], or of one position per row
    (a list) [B, 1, V]. While no row of ``kv`` has a hole the forward is the plain
    ``transformers`` one: no mask, no position ids. ``kv.commit`` must follow."""
    q = ids.size(1)
    options: dict = {}
    if kv.ragged:
        options["attention_mask"] = kv.padding_mask(q)
        options["position_ids"] = _column(start, ids.device) + torch.arange(q, device=ids.device)
    per_row = isinstance(keep, list) and any(k != q - 1 for k in keep)
    if isinstance(keep, list) and not per_row:
        keep = 1  # every row ends at the last position
    if _takes_logits_to_keep(type(model.trunk)):
        options["logits_to_keep"] = _column(keep, ids.device) if per_row else keep
    logits = model.trunk(input_ids=ids, cache=kv.cache, use_cache=True, **options).logits
    if per_row and logits.size(1) == q:  # the model computed every position's: pick each row's
        index = _column(keep, ids.device)[..., None].expand(-1, -1, logits.size(-1))
        logits = logits.gather(1, index)
    elif not per_row and logits.size(1) > keep:
        logits = logits[:, q - keep :]
    return logits, seen.get("hidden"), seen.get("branch")


def _column(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, device=device)[:, None]


# ---------------------------------------------------------------------------------------------
# The rungs of a step
# ---------------------------------------------------------------------------------------------


def prefill(
    model: MTPModel,
    prompts: list[list[int]],
    capacity: int,
    heads: object,
    sampling: Sampling,
    gen,
    seen: dict,
) -> tuple[Decoding, list[int]]:
    """One pass over the right-padded prompts (causal attention keeps each row's tokens from
    seeing its padding), logits at each row's last position only; each row's first new token.
    ``heads``: the heads' fresh draft state. Returns the state and those tokens."""
    device = model.parts.embed.weight.device
    B, P = len(prompts), max(map(len, prompts))
    lengths = [len(p) for p in prompts]
    tokens = torch.zeros(B, capacity, dtype=torch.long, device=device)
    tokens[:, :P] = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=device)
    kv = RaggedCache(B, device, model.trunk.config)
    last = [n - 1 for n in lengths]
    logits, hidden, branch = trunk_pass(model, tokens[:, :P], kv, [0] * B, seen, keep=last)
    kv.commit(lengths)
    first, _ = choose(logits[:, 0], sampling, gen)  # [B]
    tokens[torch.arange(B, device=device), torch.tensor(lengths, device=device)] = first
    # h^0 is watched only when the heads will draft
    unseen = [] if hidden is None else [Committed(None, hidden, branch, [0] * B, lengths)]
    state = Decoding(
        kv=kv,
        tokens=tokens,
        length=[n + 1 for n in lengths],
        pending=first,
        unseen=unseen,
        heads=heads,
        out=[[] for _ in prompts],
        done=[False] * B,
    )
    return state, first.tolist()


def draft(model: MTPModel, state: Decoding, K: int, drafted: int, sampling: Sampling, gen):
    """The heads draft ``drafted`` tokens per row (K <= drafted are verified) from everything
    committed since they last drafted. Returns (drafts [B, K], q [B, K, V] or None)."""
    B = state.pending.size(0)
    if K == 0:
        return state.pending.new_zeros(B, 0), None
    tokens = [state.tokens[r, : state.length[r]] for r in range(B)]
    step = _joined(state.unseen, tokens)
    state.unseen = []
    drafts, q = model.heads.draft(state.heads, step, drafted, lambda lg: choose(lg, sampling, gen))
    return drafts[:, :K], (None if q is None else q[:, :K])


def verify(model: MTPModel, state: Decoding, drafts: torch.Tensor, seen: dict):
    """One trunk pass over each row's pending token and its drafts, logits at all K+1."""
    ids = state.pending[:, None]
    if drafts.size(1):
        ids = torch.cat([ids, drafts], dim=1)  # [B, K+1]
    start = [n - 1 for n in state.length]
    return trunk_pass(model, ids, state.kv, start, seen, keep=ids.size(1))


def accept(drafts, q_draft, logits, sampling: Sampling, typical: float, gen, live: list[bool]):
    """Each live row's new tokens d_1..d_m and the bonus g_{m+1}, as lists (empty for a
    finished row) and as the rows of a [B, K+1] tensor on the device (row r's first m+1
    entries; the rest is filler). Greedy: one device sync for the whole batch."""
    if sampling.greedy:
        target = logits.argmax(-1)  # [B, K+1]: the trunk's own choices
        if drafts.size(1) == 0:  # a plain step
            return target, [row if ok else [] for row, ok in zip(target.tolist(), live)]
        m = accept_greedy_rows(drafts, target)
        flat = torch.cat([m[:, None], target], dim=1).tolist()
        return target, [row[1 : row[0] + 2] if ok else [] for row, ok in zip(flat, live)]
    K = drafts.size(1)
    new: list[list[int]] = []
    for r, ok in enumerate(live):
        if not ok:
            new.append([])
            continue
        if K == 0:
            m, nxt = 0, int(choose(logits[r, :1], sampling, gen)[0])
        elif typical > 0:
            m, nxt = accept_typical(drafts[r], probs(logits[r], sampling), typical, gen)
        else:
            m, nxt = accept_sampled(drafts[r], q_draft[r], probs(logits[r], sampling), gen)
        new.append(drafts[r, :m].tolist() + [nxt])
    padded = [row + [0] * (K + 1 - len(row)) for row in new]
    return torch.tensor(padded, device=logits.device), new


def commit(state: Decoding, new: torch.Tensor, counts: list[int], hidden, branch) -> None:
    """Row r keeps the first ``counts[r]`` of the verified slots (0 for a finished row) in every
    KV cache and ``new[r, :counts[r]]`` as its next tokens; the heads will see those positions."""
    start = [n - 1 for n in state.length]
    state.kv.commit(counts)
    for r, (n, c) in enumerate(zip(state.length, counts)):
        if c:
            state.tokens[r, n : n + c] = new[r, :c]
    last = [max(c, 1) - 1 for c in counts]  # a finished row's pending token is never used
    if len(set(last)) == 1:  # the same for every row (always at batch 1): no index tensor
        state.pending = new[:, last[0]]
    else:
        state.pending = new.gather(1, torch.tensor(last, device=new.device)[:, None]).squeeze(1)
    state.length = [n + c for n, c in zip(state.length, counts)]
    if hidden is not None:  # speculating: the heads draft from these states
        width = max(counts)
        kept_branch = None if branch is None else branch[:, :width]
        state.unseen.append(Committed(None, hidden[:, :width], kept_branch, start, counts))


def emit(state: Decoding, tokens: list[list[int]], max_new: int, stop: frozenset, on_tokens):
    """Hand each row's new tokens to the caller, up to ``max_new`` and through a stop token."""
    for r, fresh in enumerate(tokens):
        if state.done[r] or not fresh:
            continue
        fresh = fresh[: max_new - len(state.out[r])]
        cut = next((i for i, t in enumerate(fresh) if t in stop), None)
        if cut is not None:
            fresh = fresh[: cut + 1]
        state.out[r].extend(fresh)
        if on_tokens and fresh:
            on_tokens(r, fresh)
        state.done[r] = cut is not None or len(state.out[r]) >= max_new


def _joined(parts: list[Committed], tokens: list[torch.Tensor]) -> Committed:
    """The unseen positions of several steps (steps with K = 0 draft nothing) as one."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], tokens=tokens)
    new = [sum(p.new[r] for p in parts) for r in range(len(tokens))]

    def join(name: str) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        rows = [
            torch.cat([getattr(p, name)[r, : p.new[r]] for p in parts]) for r in range(len(new))
        ]
        width = max(new)
        return torch.stack([torch.nn.functional.pad(x, (0, 0, 0, width - x.size(0))) for x in rows])

    return Committed(tokens, join("hidden"), join("branch"), parts[0].start, new)


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _decode_loop(
    model: MTPModel,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    k_max: int,
    auto: bool,
    costs: CostModel | None,
    sampling: Sampling,
    gen: torch.Generator | None,
    stop: frozenset,
    on_tokens: Callable[[int, list[int]], None] | None,
    seen: dict,
) -> Generation:
    heads = model.heads.new_draft_state(len(prompts)) if cfg.speculate else None
    if not cfg.speculate:
        choice = DraftLen(0, fixed=0)
    elif auto:
        choice = DraftLen(k_max, costs=costs, stateless=not model.heads.keeps_draft_state)
    else:
        choice = DraftLen(k_max, fixed=k_max)
    capacity = max(map(len, prompts)) + cfg.max_new_tokens + 2 * (k_max + 1)
    state, first = prefill(model, prompts, capacity, heads, sampling, gen, seen)
    stats = Stats(
        trunk_passes=len(prompts), head_tries=[0] * choice.k_max, head_hits=[0] * choice.k_max
    )
    emit(state, [[t] for t in first], cfg.max_new_tokens, stop, on_tokens)
    watch = Stopwatch(state.tokens.device)
    while not all(state.done):
        live = [not d for d in state.done]
        K = choice.choose()
        with watch.section():
            drafts, q_draft = draft(model, state, K, choice.drafted(K), sampling, gen)
        logits, hidden, branch = verify(model, state, drafts, seen)
        new, accepted = accept(drafts, q_draft, logits, sampling, cfg.typical, gen, live)
        commit(state, new, [len(a) for a in accepted], hidden, branch)
        emit(state, accepted, cfg.max_new_tokens, stop, on_tokens)
        _record(stats, choice, K, accepted, watch.take())
    stats.tokens = sum(map(len, state.out))
    return Generation(state.out, stats)


def _record(stats: Stats, choice: DraftLen, K: int, accepted: list[list[int]], draft_s) -> None:
    """Count the step in ``stats`` and tell ``choice`` what it cost and what was accepted."""
    m = [len(a) - 1 for a in accepted if a]  # each live row's accepted prefix
    stats.trunk_passes += len(m)
    stats.draft_lens.append(K)
    for mr in m:
        for j in range(min(mr + 1, K)):  # d_{j+1} was tried when d_1..d_j were accepted
            stats.head_tries[j] += 1
            stats.head_hits[j] += int(j < mr)
    choice.observe(K, m)
    if K:
        seconds = sum(draft_s)
        stats.draft_s += seconds
        stats.draft_steps += 1
        choice.observe_draft(seconds, choice.drafted(K))


def generate(
    model: MTPModel,
    prompts: list[list[int]],
    config: GenerateConfig | None = None,
    eos_id: int | Iterable[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    costs: CostModel | None = None,
    **options,
) -> Generation:
    """Decode a batch of ``prompts`` (token ids, any lengths) together; a row ends at its
    ``max_new_tokens`` or at a stop token ``eos_id`` (one id, or several: chat models end a turn
    with a token of their own), which is kept as the row's last token.

    Options are the fields of :class:`GenerateConfig` (``max_new_tokens``, ``draft_len``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``, ``speculate``). ``draft_len``: ``"auto"``
    (the default) chooses K in 0..D before each step (:mod:`multitoken.costs`); a number fixes
    K (K > D for the DeepSeek family only: its last module is reused recurrently); None is D.
    ``costs``: the :class:`~multitoken.costs.CostModel` auto uses (default: measured once per
    trunk, device and dtype). ``on_tokens(row, tokens)`` is called as tokens are accepted
    (streaming)."""
    cfg = dataclasses.replace(config or GenerateConfig(), **options)
    cfg.validate()
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.speculate and model.heads is None:
        log.warning("this checkpoint has no MTP heads: decoding with the trunk alone")
        cfg = dataclasses.replace(cfg, speculate=False)
    if cfg.typical > 0 and cfg.speculate:
        log.warning(
            "typical acceptance is lossy: the output no longer follows the trunk's "
            "distribution exactly"
        )
    K, auto = _draft_len(cfg, model)
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
    recurrent = sorted(set(unrollable_layers(model.trunk.config)))
    if recurrent and (cfg.speculate or len(set(map(len, prompts))) > 1):
        raise MultitokenError(
            f"this trunk keeps a recurrent state ({', '.join(recurrent)}) that cannot give back "
            "rejected drafts or padding: speculative decoding needs a KV cache it can crop; "
            "decode with --no-speculate, prompts of one length at a time"
        )
    kernel = choose_linear_kernel(cfg.linear_kernel, model)
    with linear_kernels(model, kernel):  # one kernel for the whole call: exact against plain
        return _generate(model, prompts, cfg, K, auto, sampling, eos_id, on_tokens, costs)


def _generate(model, prompts, cfg, K, auto, sampling, eos_id, on_tokens, costs) -> Generation:
    gen = None
    if not sampling.greedy:
        gen = torch.Generator(device=model.parts.embed.weight.device)
        gen.manual_seed(0 if cfg.seed is None else cfg.seed)
    t0 = time.perf_counter()
    if auto and cfg.speculate and costs is None:
        with torch.no_grad():
            costs = cost_model(model.trunk, K + 1, prompts[0])
    window = _sliding_window(model.trunk.config)
    # Cache slots, not positions, decide what a sliding-window mask hides. Every step appends
    # the widest count any row keeps, up to K+1 when one row accepts everything while another
    # accepts nothing (and finished rows still take part), so a batch can reach the prompt's
    # slots + (K+1) per new token.
    q = K + 1 if cfg.speculate else 1
    slots = max(map(len, prompts)) + q * (cfg.max_new_tokens + 1)
    stop = (
        frozenset()
        if eos_id is None
        else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    )
    run = functools.partial(
        _decode_loop,
        model,
        cfg=cfg,
        k_max=K,
        auto=auto,
        costs=costs,
        sampling=sampling,
        gen=gen,
        stop=stop,
    )
    branch = model.heads.branch_layer if cfg.speculate else None
    # one set of hooks for the whole call; plain decoding needs none
    watching = watch_states(model.parts, branch) if cfg.speculate else contextlib.nullcontext({})
    with watching as seen:
        if len(prompts) > 1 and window is not None and slots > window:
            # Rows of a RaggedCache have holes, and a sliding-window mask counts cache slots, not
            # positions: past the window a batch would hide keys a row should see. One row at a
            # time has no holes, so it is exact.
            rows = [
                run([p], on_tokens=_for_row(on_tokens, r), seen=seen) for r, p in enumerate(prompts)
            ]
            tokens = [g.tokens[0] for g in rows]
            result = Generation(tokens, _sum_stats([g.stats for g in rows]))
        else:
            result = run(prompts, on_tokens=on_tokens, seen=seen)
    result.stats.wall_s = time.perf_counter() - t0
    return result


def _draft_len(cfg: GenerateConfig, model: MTPModel) -> tuple[int, bool]:
    """(K, or the most auto may choose; whether K is chosen per step) from ``draft_len``
    (already validated on its own)."""
    value = draft_len_value(cfg.draft_len)
    depth = model.depth or 1
    if value is None or value == "auto":
        return depth, value == "auto"
    longest = model.heads.max_draft_len() if cfg.speculate else None
    if longest is not None and value > longest:
        raise MultitokenError(
            f"{model.family} heads draft at most D = {model.depth} tokens; got {value}",
            "--draft-len",
        )
    return value, False


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
        draft_lens=[k for s in parts for k in s.draft_lens],
        draft_s=sum(s.draft_s for s in parts),
        draft_steps=sum(s.draft_steps for s in parts),
    )
