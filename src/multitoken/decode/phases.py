"""The rungs of one decoding step, each a small function over explicit state (:class:`Decoding`):

    prefill  one trunk pass over the prompts; logits only at each row's last position
    draft    the heads propose d_1..d_K from what the trunk has committed (K = 0: a plain step)
    verify   one trunk pass over [pending, d_1..d_K] gives the trunk's own choices g_1..g_{K+1}
    accept   each row keeps its longest correct prefix d_1..d_m and the bonus g_{m+1}
    commit   every KV cache keeps exactly the accepted prefix (``RaggedCache``: rows of a batch
             may accept different numbers of tokens in the same step); the tokens join the rows
    emit     the caller gets each row's new tokens, up to its budget and through a stop token
    retire   rows that are done leave the batch

:func:`multitoken.decode.api.generate` climbs them in that order. A step syncs the host with the
device once, when :func:`accept` reads the accepted counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from multitoken.config import GenerateConfig
from multitoken.decode.kvcache import RaggedCache, trunk_attention_mask
from multitoken.decode.sampling import (
    Sampling,
    accept_greedy_rows,
    accept_sampled_rows,
    accept_typical_rows,
    choose,
    probs,
)
from multitoken.decode.trees.shape import Tree
from multitoken.decode.trees.spec import Dynamic
from multitoken.heads.base import Committed, MTPHeads
from multitoken.trunk import TrunkParts, watch_states

OnTokens = Callable[[int, list[int]], None]


class Decodable(Protocol):
    """What decoding reads of a model (:class:`multitoken.model.MTPModel` is one): the trunk as
    the causal LM it is, the parts heads share with it, and the heads (None: the trunk alone).
    Decoding depends on this, not on the model class, whose text API calls down into it."""

    trunk: PreTrainedModel
    parts: TrunkParts
    heads: MTPHeads | None

    @property
    def family(self) -> str: ...

    @property
    def depth(self) -> int: ...


@dataclass
class Decoding:
    """The state one call carries from rung to rung (nothing is kept on the model). Index b is
    a row of the batch still decoding; ``rows[b]`` is the caller's index of that prompt."""

    kv: RaggedCache  # the trunk's cache
    tokens: torch.Tensor  # [B, capacity]: row b's committed tokens are tokens[b, :length[b]]
    length: list[int]  # committed tokens per row; the last one is pending
    pending: torch.Tensor  # [B] each row's pending token (the trunk's latest choice)
    unseen: list[Committed]  # trunk states the heads have not drafted from yet, oldest first
    heads: object  # the heads' draft state (None for heads that keep none)
    rows: list[int]  # the caller's index of each row still in the batch
    out: list[list[int]]  # the new tokens of every prompt (caller's order), as the caller gets them


@dataclass
class Verified:
    """What one trunk pass gives: logits at the positions asked for, and the states the heads
    draft from (None when not asked)."""

    logits: torch.Tensor  # [B, keep, V]
    hidden: torch.Tensor | None  # [B, q, d] h^0
    branch: torch.Tensor | None  # [B, q, d] the stream entering the branch layer (meta)


# ---------------------------------------------------------------------------------------------
# The trunk
# ---------------------------------------------------------------------------------------------


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def trunk_pass(
    model: Decodable,
    ids: torch.Tensor,
    kv: RaggedCache,
    start: list[int],
    keep: int | list[int],
    states: bool = False,
    branch_layer: int | None = None,
    layout: tuple[torch.Tensor, torch.Tensor | dict] | None = None,
) -> Verified:
    """Run ``ids`` [B, q] on top of ``kv``, row r's first token at position ``start[r]``.

    ``keep``: logits of the last ``keep`` positions [B, keep, V], or of one position per row
    (a list) [B, 1, V]. ``states``: also return h^0 and, with ``branch_layer``, the stream
    entering that layer, watched for this pass only. While no row of ``kv`` has a hole the
    forward is the plain ``transformers`` one: no mask, no position ids. ``layout``: the
    position ids and attention mask to use instead (a tree's). ``kv.commit`` must follow."""
    q = ids.size(1)
    options: dict = {}
    if layout is not None:
        options["position_ids"], options["attention_mask"] = layout
    elif kv.ragged:
        begin = torch.tensor(start, device=ids.device)
        options["position_ids"] = begin[:, None] + torch.arange(q, device=ids.device)
        dtype = model.parts.embed.weight.dtype
        options["attention_mask"] = trunk_attention_mask(kv, begin, q, dtype)
    per_row = isinstance(keep, list) and any(k != q - 1 for k in keep)
    if isinstance(keep, list) and not per_row:
        keep = 1  # every row ends at the last position
    if _takes_logits_to_keep(type(model.trunk)):
        options["logits_to_keep"] = _column(keep, ids.device) if per_row else keep
    watching = watch_states(model.parts, branch_layer) if states else contextlib.nullcontext({})
    with watching as seen:
        logits = model.trunk(input_ids=ids, cache=kv.cache, use_cache=True, **options).logits
    if per_row and logits.size(1) == q:  # the model computed every position's: pick each row's
        index = _column(keep, ids.device)[..., None].expand(-1, -1, logits.size(-1))
        logits = logits.gather(1, index)
    elif not per_row and logits.size(1) > keep:
        logits = logits[:, q - keep :]
    return Verified(logits, seen.get("hidden"), seen.get("branch"))


def _column(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, device=device)[:, None]


# ---------------------------------------------------------------------------------------------
# The rungs of a step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What stays fixed through a call: the options, the most drafts a step verifies, how
    tokens are chosen and where rows stop."""

    cfg: GenerateConfig
    k_max: int
    auto: bool
    sampling: Sampling
    stop: frozenset
    gen: torch.Generator | None = None
    tree: Tree | Dynamic | None = None  # --tree: steps verify trees instead of a chain
    tree_auto: bool = False  # --tree auto: each step's tree is chosen by the costs
    lookup: int = 0  # --tree ...+lookup:L: prompt lookup's L tokens join each row's tree

    @property
    def deepest(self) -> int:
        """The most tokens past the pending one that a step can accept."""
        return max(self.k_max, self.lookup)

    @property
    def speculate(self) -> bool:
        return self.cfg.speculate


def prefill(model: Decodable, prompts: list[list[int]], plan: Plan) -> Decoding:
    """One pass over the right-padded prompts (causal attention keeps each row's tokens from
    seeing its padding), logits at each row's last position only; each row's first new token
    becomes its pending token."""
    device = model.parts.embed.weight.device
    B, P = len(prompts), max(map(len, prompts))
    lengths = [len(p) for p in prompts]
    capacity = P + plan.cfg.max_new_tokens + 2 * (plan.deepest + 1)
    tokens = torch.zeros(B, capacity, dtype=torch.long, device=device)
    tokens[:, :P] = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=device)
    kv = RaggedCache(B, device, model.trunk.config)
    last = [n - 1 for n in lengths]
    branch = model.heads.branch_layer if plan.speculate else None
    out = trunk_pass(model, tokens[:, :P], kv, [0] * B, last, plan.speculate, branch)
    kv.commit(lengths)
    first, _ = choose(out.logits[:, 0], plan.sampling, plan.gen)  # [B]
    tokens[torch.arange(B, device=device), torch.tensor(lengths, device=device)] = first
    unseen = []  # h^0 is watched only when the heads will draft
    if plan.speculate:
        unseen = [Committed(None, out.hidden, out.branch, [0] * B, lengths)]
    heads = model.heads.new_draft_state(B) if plan.speculate else None
    return Decoding(
        kv=kv,
        tokens=tokens,
        length=[n + 1 for n in lengths],
        pending=first,
        unseen=unseen,
        heads=heads,
        rows=list(range(B)),
        out=[[] for _ in prompts],
    )


def draft(model: Decodable, state: Decoding, K: int, drafted: int, plan: Plan):
    """The heads draft ``drafted`` tokens per row (K <= drafted are verified) from everything
    committed since they last drafted. Returns (drafts [B, K], q [B, K, V] or None)."""
    B = state.pending.size(0)
    if K == 0:
        return state.pending.new_zeros(B, 0), None
    tokens = [state.tokens[b, : state.length[b]] for b in range(B)]
    step = _joined(state.unseen, tokens)
    state.unseen = []
    pick = functools.partial(choose, sampling=plan.sampling, generator=plan.gen)
    drafts, q = model.heads.draft(state.heads, step, drafted, pick)
    return drafts[:, :K], (None if q is None else q[:, :K])


def verify(model: Decodable, state: Decoding, drafts: torch.Tensor, plan: Plan) -> Verified:
    """One trunk pass over each row's pending token and its drafts, logits at all K+1; the
    heads' states come along whenever the call speculates."""
    ids = torch.cat([state.pending[:, None], drafts], dim=1)  # [B, K+1]
    start = [n - 1 for n in state.length]
    branch = model.heads.branch_layer if plan.speculate else None
    return trunk_pass(model, ids, state.kv, start, ids.size(1), plan.speculate, branch)


def accept(drafts, q_draft, logits, plan: Plan) -> tuple[torch.Tensor, list[list[int]]]:
    """Each row's new tokens d_1..d_m and the bonus g_{m+1}: as the rows of a [B, K+1] tensor
    on the device (row b's first m+1 entries; the rest is filler) and as lists, read with one
    device sync for the whole batch."""
    K = drafts.size(1)
    if plan.sampling.greedy:
        new = logits.argmax(-1)  # [B, K+1]: the trunk's own choices, bonus included
        m = accept_greedy_rows(drafts, new) if K else new.new_zeros(new.size(0))
    else:
        p = probs(logits, plan.sampling)  # [B, K+1, V]
        if K == 0:
            m, bonus = p.new_zeros(p.size(0), dtype=torch.long), choose_from(p[:, 0], plan)
        elif plan.cfg.typical > 0:
            m, bonus = accept_typical_rows(drafts, p, plan.cfg.typical, plan.gen)
        else:
            m, bonus = accept_sampled_rows(drafts, q_draft, p, plan.gen)
        new = torch.cat([drafts, bonus[:, None]], dim=1)
        new.scatter_(1, m[:, None], bonus[:, None])  # the bonus right after the accepted prefix
    flat = torch.cat([m[:, None], new], dim=1).tolist()  # the one sync of a step
    return new, [row[1 : row[0] + 2] for row in flat]


def choose_from(p: torch.Tensor, plan: Plan) -> torch.Tensor:
    """One sample per row of ``p`` [B, V]."""
    return torch.multinomial(p, 1, generator=plan.gen).squeeze(1)


def commit(state: Decoding, new: torch.Tensor, counts: list[int], verified: Verified) -> None:
    """Row b keeps the first ``counts[b]`` of the verified slots in every KV cache and
    ``new[b, :counts[b]]`` as its next tokens; the heads will see those positions."""
    start = [n - 1 for n in state.length]
    state.kv.commit(counts)
    device = new.device
    # the widest row's count is written for every row; past a row's count, later steps
    # overwrite it
    width = max(counts)
    slots = torch.tensor(state.length, device=device)[:, None] + torch.arange(width, device=device)
    state.tokens.scatter_(1, slots, new[:, :width])
    last = [c - 1 for c in counts]
    if len(set(last)) == 1:  # the same for every row (always at batch 1): no index tensor
        state.pending = new[:, last[0]]
    else:
        state.pending = new.gather(1, _column(last, device)).squeeze(1)
    state.length = [n + c for n, c in zip(state.length, counts)]
    if verified.hidden is not None:  # speculating: the heads draft from these states
        width = max(counts)
        branch = None if verified.branch is None else verified.branch[:, :width]
        state.unseen.append(Committed(None, verified.hidden[:, :width], branch, start, counts))


def emit(state: Decoding, accepted: list[list[int]], plan: Plan, on_tokens) -> list[int]:
    """Hand each row's new tokens to the caller, up to ``max_new_tokens`` and through a stop
    token. Returns the batch rows that are now done."""
    done = []
    for b, fresh in enumerate(accepted):
        out = state.out[state.rows[b]]
        fresh = fresh[: plan.cfg.max_new_tokens - len(out)]
        cut = next((i for i, t in enumerate(fresh) if t in plan.stop), None)
        if cut is not None:
            fresh = fresh[: cut + 1]
        out.extend(fresh)
        if on_tokens and fresh:
            on_tokens(state.rows[b], fresh)
        if cut is not None or len(out) >= plan.cfg.max_new_tokens:
            done.append(b)
    return done


def retire(model: Decodable, state: Decoding, done: list[int]) -> None:
    """Rows that are done leave the batch: every cache and buffer keeps the others only."""
    if not done:
        return
    live = [b for b in range(len(state.rows)) if b not in set(done)]
    state.rows = [state.rows[b] for b in live]
    if not live:
        return
    index = torch.tensor(live, device=state.tokens.device)
    state.kv.select(index)
    state.tokens = state.tokens[index]
    state.length = [state.length[b] for b in live]
    state.pending = state.pending[index]
    state.unseen = [c.select(index) for c in state.unseen]
    if state.heads is not None:
        state.heads = model.heads.select_draft_rows(state.heads, index)


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


def chain_step(model: Decodable, state: Decoding, plan: Plan, K: int, drafted: int, watch):
    """draft → verify → accept → commit with a chain of K drafts; each row's new tokens."""
    with watch.section() if K else contextlib.nullcontext():  # a plain step drafts nothing
        drafts, q_draft = draft(model, state, K, drafted, plan)
    verified = verify(model, state, drafts, plan)
    new, accepted = accept(drafts, q_draft, verified.logits, plan)
    commit(state, new, [len(a) for a in accepted], verified)
    return accepted
