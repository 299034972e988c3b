"""Draft-time state of DeepSeek's causal chain (:mod:`multitoken.heads.deepseek`): each module's
own KV cache, the committed states it has not taken into that cache yet, and the one piece of
bookkeeping by which chain drafting and tree drafting alike catch a module up on the positions
committed since it last ran (:meth:`DeepSeekDraftState.catch_up`).

Positions are counted as in :meth:`~multitoken.heads.deepseek.DeepSeekHeads.draft`: a row of N
committed tokens (the last, x_{N-1}, the trunk's pending token) has h^0 up to N-2, and module k
at position p reads h^{k-1}_p and Emb(x_{p+k}). Its positions up to N-1-k read committed tokens
only: those go into its cache. Counts per row are plain ints on the host, so that this
bookkeeping reads nothing back from tensors; what a forward needs of them on the device goes up
in one transfer per module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from multitoken.decode.kvcache import RaggedCache


@dataclass
class ModuleInputs:
    """What module k reads over the positions it runs this step, row r's from its first
    uncached position on: ``count[r]`` real ones, then filler up to q = max(1, max count)."""

    hidden: torch.Tensor  # [B, q, d] h^{k-1}
    positions: torch.Tensor  # [B, q] long
    ahead: torch.Tensor  # [B, q] the tokens x_{p+k} read there
    count: list[int]  # [B] real positions per row
    count_on_device: torch.Tensor  # [B] the same, long, where ``hidden`` is
    kv: RaggedCache  # the module's cache: the forward attends over it and appends to it


@dataclass
class DeepSeekDraftState:
    """Decode-time state of the chain, passed explicitly, for each (virtual) module k = i + 1:
    its KV cache, ``done[i]`` the positions of each row it holds, and ``held[i]`` [B, W, d] the
    committed h^{k-1} at positions ``done[i]`` onwards that it has not taken into its cache yet,
    ``held_len[i]`` of them per row (one, between steps, for k > 1: h^{k-1} at N-k, whose token
    x_N is not committed yet). Counts are lists of ints, one per row."""

    batch: int
    device: torch.device
    caches: list[RaggedCache] = field(default_factory=list)
    done: list[list[int]] = field(default_factory=list)
    held: list[torch.Tensor] = field(default_factory=list)
    held_len: list[list[int]] = field(default_factory=list)

    def ensure(self, K: int, hidden: torch.Tensor) -> None:
        """An empty chain of K modules at the first draft; the same K at every later one (a
        module left out of a step would miss the states the next one reads)."""
        if self.caches:
            if K != len(self.caches):
                raise ValueError(f"the chain drafted {len(self.caches)} tokens before, not {K}")
            return
        empty = hidden.new_zeros(self.batch, 0, hidden.size(-1))
        self.caches = [RaggedCache(self.batch, self.device) for _ in range(K)]
        self.done = [[0] * self.batch for _ in range(K)]
        self.held = [empty] * K
        self.held_len = [[0] * self.batch for _ in range(K)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ([n] long, in that order)."""
        keep = rows.tolist()
        for kv in self.caches:
            kv.select(rows)
        self.done = [[done[r] for r in keep] for done in self.done]
        self.held = [held[rows.to(held.device)] for held in self.held]
        self.held_len = [[n[r] for r in keep] for n in self.held_len]
        self.batch = len(keep)

    def join(self, other: DeepSeekDraftState) -> None:
        """Append ``other``'s rows after this state's. A side that has not drafted yet holds
        nothing: its rows join every module empty, as a fresh state's would be."""
        if not self.caches and not other.caches:
            self.batch += other.batch
            return
        chain = self.held if self.caches else other.held
        for side in (self, other):
            if not side.caches:
                side.ensure(len(chain), chain[0].new_zeros(side.batch, 0, chain[0].size(-1)))
        if len(self.caches) != len(other.caches):
            raise ValueError(f"chains of {len(self.caches)} and {len(other.caches)} modules")
        for i in range(len(self.caches)):
            self.caches[i].extend(other.caches[i])
            self.done[i] = self.done[i] + other.done[i]
            self.held_len[i] = self.held_len[i] + other.held_len[i]
            a, b = self.held[i], other.held[i]
            width = max(a.size(1), b.size(1))
            pad = torch.nn.functional.pad
            self.held[i] = torch.cat(
                [pad(a, (0, 0, 0, width - a.size(1))), pad(b, (0, 0, 0, width - b.size(1)))]
            )
        self.batch += other.batch

    def catch_up(
        self,
        k: int,
        N: list[int],
        ext: torch.Tensor,
        fresh: torch.Tensor,
        fresh_len: list[int],
        forward: Callable[[ModuleInputs], torch.Tensor],
        through_drafts: bool,
    ) -> tuple[torch.Tensor, ModuleInputs]:
        """Run module k over each row's positions from ``done`` on, and take into its cache
        those that read committed tokens only (up to N-1-k; N [B] committed tokens a row,
        ``ext`` [B, >= max N] those tokens, and any drafts after them).

        The positions run end at N-1-k, or with ``through_drafts`` (chain drafting) at N-2,
        the last position the trunk has computed: those past N-1-k read drafts, are computed
        for this step only and never kept. h^{k-1} there is what the cache had not taken yet
        (``held``) followed by what module k-1 (the trunk, for k = 1) computed this step,
        ``fresh`` [B, *, d], ``fresh_len`` [B] of it a row. ``forward`` runs the module over
        the :class:`ModuleInputs` (and over anything it appends: tree nodes); then the
        committed h^{k-1} the cache has not taken, up to N-2 (the trunk's) or N-k (a
        module's), stays held for the next step. Returns ``forward``'s output and its inputs.
        """
        i = k - 1
        kv, done, held, held_len = self.caches[i], self.done[i], self.held[i], self.held_len[i]
        last = [n - 2 if through_drafts else n - 1 - k for n in N]  # the last position run
        count = [max(t + 1 - d, 0) for t, d in zip(last, done)]
        committed = [max(n - k - d, 0) for n, d in zip(N, done)]
        frontier = [n - max(k, 2) for n in N]  # h^{k-1} committed up to here
        keep = [max(f + 1 - d - c, 0) for f, d, c in zip(frontier, done, committed)]
        available = [max(max(t, f) + 1 - d, 0) for t, f, d in zip(last, frontier, done)]
        assert [a + b for a, b in zip(held_len, fresh_len)] == available, (
            "h^{k-1} must stay contiguous"
        )
        q = max(max(count), 1)
        device = fresh.device
        # one transfer for every per-row count the forward and the join need on the device
        done_d, held_len_d, committed_d, count_d = torch.tensor(
            [done, held_len, committed, count], device=device
        )
        width = max(q, max(c + n for c, n in zip(committed, keep)))
        joined = _join_rows(held, held_len_d, fresh, width)  # [B, width, d]
        positions = done_d[:, None] + torch.arange(q, device=device)  # [B, q]
        ahead = ext.gather(1, (positions + k).clamp(max=ext.size(1) - 1))  # x_{p+k}
        inputs = ModuleInputs(joined[:, :q], positions, ahead, count, count_d, kv)
        out = forward(inputs)
        kv.commit(committed)
        self.held[i], self.held_len[i] = _take_rows(joined, committed_d, max(keep, default=0)), keep
        self.done[i] = [d + c for d, c in zip(done, committed)]
        return out, inputs


def _join_rows(a: torch.Tensor, a_len: torch.Tensor, b: torch.Tensor, q: int) -> torch.Tensor:
    """[B, q, d]: row r's first ``a_len[r]`` entries of ``a`` [B, Wa, d], then ``b`` [B, Wb, d]
    from its start (``a_len`` [B] where ``b`` is). Entries past a row's own count are filler
    (never committed, and causal attention keeps them from the positions before)."""
    B, d = b.size(0), b.size(-1)
    if b.size(1) < q:  # room for any row whose a part is empty
        b = torch.cat([b, b.new_zeros(B, q - b.size(1), d)], dim=1)
    j = torch.arange(q, device=b.device)[None, :]
    a_len = a_len[:, None]
    index = torch.where(j < a_len, j, a.size(1) + j - a_len)  # [B, q] into [a ; b]
    index = index.clamp(max=a.size(1) + b.size(1) - 1)
    both = torch.cat([a, b], dim=1)  # [B, Wa + Wb, d]
    return both.gather(1, index[..., None].expand(-1, -1, d))


def _take_rows(x: torch.Tensor, begin: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width, d]: row r's entries ``begin[r]`` onwards of ``x`` [B, W, d], left-aligned
    (past a row's own count: filler; ``begin`` [B] where ``x`` is)."""
    j = torch.arange(width, device=x.device)[None, :]
    index = (begin[:, None] + j).clamp(max=max(x.size(1) - 1, 0))  # [B, width]
    return x.gather(1, index[..., None].expand(-1, -1, x.size(-1)))
