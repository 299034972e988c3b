"""The phases of one decoding step, each a small function over explicit state (:class:`Decoding`):

    prefill  one trunk pass over the prompts; logits only at each row's last position
    propose  a draft source proposes each row's candidates: a chain d_1..d_K
             (:mod:`multitoken.decode.chain`) or a tree (:mod:`multitoken.decode.trees.step`);
             K = 0 is a plain step
    verify   one trunk pass over the pending token and the candidates gives the trunk's choices
    accept   each row keeps its longest correct candidates and the trunk's next token; the one
             read of the device a step makes (:class:`Accepted`)
    commit   every KV cache keeps exactly the accepted tokens (``RaggedCache``: rows of a batch
             may accept different numbers in the same step); the tokens join the rows
    observe  the draft source learns what was accepted
    emit     the caller gets each row's new tokens, up to its budget and through a stop token
    retire   rows that are done leave the batch

A server's engine (:mod:`multitoken.serve.engine`) runs the same step, and between steps lets
rows prefilled apart join the batch (:mod:`multitoken.decode.batching`).

:func:`multitoken.decode.api.decode` runs them in that order.
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
from multitoken.decode.sampling import Generators, RowSampling, Sampling, draw_tokens
from multitoken.decode.trees.spec import TreeSpec
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
    """The state one call carries from phase to phase (nothing is kept on the model). Index b is
    a row of the batch still decoding; ``rows[b]`` is the caller's index of that prompt."""

    kv: RaggedCache  # the trunk's cache
    tokens: torch.Tensor  # [B, capacity]: row b's committed tokens are tokens[b, :length[b]]
    length: list[int]  # committed tokens per row; the last one is pending
    pending: torch.Tensor  # [B] each row's pending token (the trunk's latest choice)
    undrafted: list[Committed]  # trunk states the heads have not drafted from yet, oldest first
    heads: object  # the heads' draft state (None for heads that keep none)
    rows: list[int]  # the caller's index of each row still in the batch
    out: list[list[int]]  # the new tokens of every prompt (caller's order), as the caller gets them
    # the host's copy of each row's committed tokens (tokens[b, :length[b]]), kept from what the
    # accept phase read anyway: prompt lookup searches it without reading the device
    history: list[list[int]]


@dataclass
class Verified:
    """What one trunk pass gives: logits at the positions asked for, and the states the heads
    draft from (None when not asked)."""

    logits: torch.Tensor  # [B, keep, V]
    hidden: torch.Tensor | None  # [B, q, d] h^0
    branch: torch.Tensor | None  # [B, q, d] the stream entering the branch layer (meta)


@dataclass
class Accepted:
    """What a step's accept phase gives: each row's new tokens (the accepted candidates and the
    trunk's next token) as lists, read from the device once, and as the rows of a [B, W] tensor
    on the device; the verified states, and for a tree the order that puts each row's kept
    nodes first among the new cache slots (None: a chain, kept as a prefix already)."""

    tokens: list[list[int]]
    new: torch.Tensor  # [B, W]: row b's first len(tokens[b]) entries; the rest is filler
    verified: Verified
    order: torch.Tensor | None = None  # [B, w] each row's kept nodes from the root (then filler)
    paths: list[list[int]] | None = None  # a tree's kept nodes per row, from the root

    @property
    def counts(self) -> list[int]:
        return [len(a) for a in self.tokens]


def read_host(tensor: torch.Tensor) -> torch.Tensor:
    """The one way a step reads the device: ``tensor`` copied to the host (on a CPU, itself).
    A step calls it once, to accept; per-row trees once more, before the verify pass whose
    shape their kept nodes decide. Reads anywhere else in a step are bugs (tests count them)."""
    return tensor.cpu()


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
# The phases of a step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What stays fixed through a call: the options, the most drafts a step verifies, how
    tokens are chosen and where rows stop."""

    cfg: GenerateConfig
    k_max: int
    auto: bool
    sampling: Sampling | RowSampling  # one for every row, or each row's (a server's batch)
    stop: frozenset
    gen: Generators = None  # one generator for the batch, or each row's
    tree: TreeSpec | None = None  # --tree: steps verify trees instead of a chain (None: chains)

    @property
    def lookup(self) -> int:
        """The most prompt-lookup tokens merged into each row's tree (0: none)."""
        return self.tree.lookup if self.tree is not None else 0

    @property
    def deepest(self) -> int:
        """The most tokens past the pending one that a step can accept."""
        return max(self.k_max, self.lookup)

    @property
    def speculate(self) -> bool:
        return self.cfg.speculate


def prefill(model: Decodable, prompts: list[list[int]], plan: Plan, final: bool = True) -> Decoding:
    """One pass over the right-padded prompts (causal attention keeps each row's tokens from
    seeing its padding), logits at each row's last position only; each row's first new token
    becomes its pending token. ``final=False``: the prompts are only the first chunk of one
    (:func:`multitoken.decode.batching.extend_prefill` passes the rest); no token is drawn."""
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
    first = None
    if final:
        first, _ = draw_tokens(out.logits[:, 0], plan.sampling, plan.gen)  # [B]
        tokens[torch.arange(B, device=device), torch.tensor(lengths, device=device)] = first
    undrafted = []  # h^0 is watched only when the heads will draft
    if plan.speculate:
        undrafted = [Committed(None, out.hidden, out.branch, [0] * B, lengths)]
    heads = model.heads.new_draft_state(B) if plan.speculate else None
    return Decoding(
        kv=kv,
        tokens=tokens,
        length=[n + final for n in lengths],
        pending=first,
        undrafted=undrafted,
        heads=heads,
        rows=list(range(B)),
        out=[[] for _ in prompts],
        history=[list(p) for p in prompts],  # the first tokens join when they are read
    )


def commit(state: Decoding, accepted: Accepted) -> None:
    """Row b keeps its ``accepted`` tokens' slots in every KV cache (for a tree, its kept nodes
    moved first) and the tokens as its next ones; the heads will see those positions."""
    counts, verified = accepted.counts, accepted.verified
    if accepted.order is not None:
        verified = _moved_first(state, accepted.order, verified)
    start = [n - 1 for n in state.length]
    state.kv.commit(counts)
    new, device = accepted.new, accepted.new.device
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
    for row, fresh in zip(state.history, accepted.tokens):
        row.extend(fresh)
    if verified.hidden is not None:  # speculating: the heads draft from these states
        branch = None if verified.branch is None else verified.branch[:, :width]
        state.undrafted.append(Committed(None, verified.hidden[:, :width], branch, start, counts))


def _moved_first(state: Decoding, order: torch.Tensor, verified: Verified) -> Verified:
    """Put each row's kept tree nodes (``order`` [B, w]: the path from the root, then filler)
    first among the new cache slots and the states the heads read, so that they are kept as
    a prefix."""
    state.kv.reorder_new(order, verified.logits.size(1))

    def reorder(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.gather(1, order[..., None].expand(-1, -1, x.size(-1)))

    return Verified(verified.logits, reorder(verified.hidden), reorder(verified.branch))


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
    state.undrafted = [c.select(index) for c in state.undrafted]
    state.history = [state.history[b] for b in live]
    if state.heads is not None:
        state.heads = model.heads.select_draft_rows(state.heads, index)


def heads_input(state: Decoding) -> Committed:
    """What the heads draft from this step: every state committed since they last drafted
    (several steps' when plain steps drafted nothing), with each row's committed tokens."""
    tokens = [state.tokens[b, : state.length[b]] for b in range(len(state.length))]
    parts, state.undrafted = state.undrafted, []
    return join_parts(parts, tokens)


def join_parts(parts: list[Committed], tokens: list[torch.Tensor]) -> Committed:
    """The undrafted positions of several steps (steps with K = 0 draft nothing) as one."""
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
