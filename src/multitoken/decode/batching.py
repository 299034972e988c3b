"""Continuous batching: what a server's engine (:mod:`multitoken.serve.engine`) does between the
steps of :mod:`multitoken.decode.phases` besides retiring rows.

    extend_prefill  the next chunk of a long prompt prefilled alone, so that it does not stall
                    the batch for longer than a chunk
    join            rows prefilled apart join the running batch: every cache (the trunk's
                    ``RaggedCache``, the heads' draft state) and buffer takes them in, each row
                    keeping its own positions
"""

from __future__ import annotations

import torch

from multitoken.decode.phases import Decodable, Decoding, Plan, join_parts, trunk_pass
from multitoken.decode.sampling import draw_tokens
from multitoken.heads.base import Committed


def extend_prefill(
    model: Decodable, state: Decoding, chunk: list[int], plan: Plan, final: bool
) -> None:
    """One more chunk of the prompt of ``state`` (one row, from ``prefill(..., final=False)``)
    through the trunk; with the ``final`` chunk the row's first token is drawn, as
    :func:`~multitoken.decode.phases.prefill` draws it."""
    done, n = state.length[0], len(chunk)
    capacity = done + n + plan.cfg.max_new_tokens + 2 * (plan.deepest + 1)
    if state.tokens.size(1) < capacity:
        state.tokens = torch.nn.functional.pad(state.tokens, (0, capacity - state.tokens.size(1)))
    device = state.tokens.device
    state.tokens[0, done : done + n] = torch.tensor(chunk, device=device)
    branch = model.heads.branch_layer if plan.speculate else None
    out = trunk_pass(
        model, state.tokens[:, done : done + n], state.kv, [done], 1, plan.speculate, branch
    )
    state.kv.commit([n])
    state.history[0].extend(chunk)
    if plan.speculate:
        state.undrafted.append(Committed(None, out.hidden, out.branch, [done], [n]))
    state.length = [done + n]
    if final:
        state.pending, _ = draw_tokens(out.logits[:, 0], plan.sampling, plan.gen)  # [1]
        state.tokens[0, done + n] = state.pending[0]
        state.length = [done + n + 1]


def join(model: Decodable, state: Decoding, newcomer: Decoding) -> None:
    """The rows of ``newcomer`` (prompts prefilled apart, :func:`prefill`) join the batch after
    ``state``'s, between steps (continuous batching): every cache and buffer takes them in,
    each row keeping its own positions. ``state.out`` stays the caller's: the joining rows'
    outputs are wherever the caller keeps them."""
    capacity = max(state.tokens.size(1), newcomer.tokens.size(1))

    def widened(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, capacity - t.size(1)))

    state.tokens = torch.cat([widened(state.tokens), widened(newcomer.tokens)])
    state.kv.extend(newcomer.kv)
    state.length = state.length + newcomer.length
    state.pending = torch.cat([state.pending, newcomer.pending])
    if bool(state.undrafted) != bool(newcomer.undrafted):
        raise ValueError("a speculating batch and a plain one cannot join")
    if state.undrafted:
        ours, theirs = (join_parts(s.undrafted, [None] * len(s.rows)) for s in (state, newcomer))
        state.undrafted = [_stacked(ours, theirs)]
    if state.heads is not None:
        state.heads = model.heads.join_draft_rows(state.heads, newcomer.heads)
    state.rows = state.rows + newcomer.rows
    state.history = state.history + newcomer.history


def _stacked(a: Committed, b: Committed) -> Committed:
    """The rows of ``a`` then those of ``b`` as one :class:`Committed` (tokens filled in when the
    heads draft)."""

    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        width = max(x.size(1), y.size(1))
        pad = torch.nn.functional.pad
        return torch.cat(
            [pad(x, (0, 0, 0, width - x.size(1))), pad(y, (0, 0, 0, width - y.size(1)))]
        )

    return Committed(
        None, cat(a.hidden, b.hidden), cat(a.branch, b.branch), a.start + b.start, a.new + b.new
    )
