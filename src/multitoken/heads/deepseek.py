"""DeepSeek-V3 sequential MTP modules (DeepSeek-V3 technical report §2.2), keeping the causal chain.

Module k at position i:

    h'^k_i = eh_proj( [ enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i) ] )     eh_proj: 2d -> d
    h^k    = TRM_k(h'^k)                                               one causal block
    P^k_{i+k+1} = Unembed(shared_head.norm(h^k_i))

The paper writes [h ; emb]; released checkpoints and the engines that load them (vLLM, SGLang)
concatenate the embedding first, and so do we, so their weights load without permuting columns.
Parameter names follow the DeepSeek-V3 checkpoint (``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``); ``block`` is a decoder layer of the trunk's own class, built as that
checkpoint builds its MTP layers (MoE even where the trunk's first layers are dense), so a
released module maps onto it: ``multitoken.io.v3layout`` reads and writes that layout and says how
other loaders' chains differ. ``Emb`` and ``Unembed`` are the trunk's; with a draft vocabulary
(``--draft-vocab N``) ``Unembed`` is used over N tokens only (:mod:`multitoken.heads.draft_vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.decode.kvcache import RaggedCache, position_mask
from multitoken.errors import MultitokenError
from multitoken.heads.base import Choose, Committed, HeadInputs, MTPHeads, Pick, register
from multitoken.heads.draft_vocab import DraftVocab
from multitoken.trunk import TrunkParts, run_layer

if TYPE_CHECKING:  # type only: trees are built by the decoder
    from multitoken.decode.trees.shape import Tree


# Names of the projections by which a decoder layer's sub-layers write into the residual
# stream, across the architectures transformers builds (attention: o_proj, out_proj, dense,
# c_proj; MLP: down_proj, fc2, w2, c_proj, dense_4h_to_h; fused MoE experts' down_proj).
RESIDUAL_WRITERS = {
    "o_proj",
    "out_proj",
    "dense",
    "down_proj",
    "fc2",
    "w2",
    "c_proj",
    "dense_4h_to_h",
}


class DeepSeekModule(nn.Module):
    def __init__(self, parts: TrunkParts, index: int, init_from_trunk: bool = False) -> None:
        super().__init__()
        d = parts.hidden_size
        ref = parts.embed.weight
        self.enorm = parts.new_norm()
        self.hnorm = parts.new_norm()
        self.eh_proj = nn.Linear(2 * d, d, bias=False, device=ref.device, dtype=ref.dtype)
        self.block = parts.new_layer(mtp_index=index)
        # the block attends as its layer kind says (a sliding window for a sliding block), in
        # training and in decoding alike
        self.kind = parts.block_kind(mtp_index=index)
        self.shared_head = nn.ModuleDict({"norm": parts.new_norm()})
        if init_from_trunk:
            parts.model._init_weights(self.eh_proj)
            self._copy_last_layer(parts)
        else:
            self._start_as_identity(d)

    def _start_as_identity(self, d: int) -> None:
        """Start as the identity on h^{k-1}, so that a fresh module predicts what the trunk
        predicts at i, as a fresh BPD head does, and learns from there what the token t_{i+k}
        adds: ``eh_proj`` reads only the ``hnorm`` half (the identity there, zero on the
        ``enorm`` half, whose weights grow from the first step), and the block's residual
        writes (:data:`RESIDUAL_WRITERS`) start at zero, so the block adds nothing until it has
        learnt something (as zero-initialised residual branches do). The rest of the block
        keeps the trunk's ``_init_weights`` noise.

        Why: on SmolLM2-135M, frozen, 200k tokens of code, module 1's held-out acceptance a_1
        was 0.706 from this start, against 0.676 from a copy of the trunk's last layer (the
        earlier default: that layer expects the trunk's deep residual stream, not eh_proj's
        output, and starts at a_1 = 0.001), 0.672 from noise, and 0.673 for a BPD head
        (benchmarks/deepseek_init.py)."""
        with torch.no_grad():
            self.eh_proj.weight.zero_()
            self.eh_proj.weight[:, d:] = torch.eye(d, dtype=self.eh_proj.weight.dtype)
            for name, param in self.block.named_parameters():
                if RESIDUAL_WRITERS & set(name.split(".")):
                    param.zero_()

    def _copy_last_layer(self, parts: TrunkParts) -> None:
        """Start the block as a copy of the trunk's last decoder layer: on a pretrained trunk
        that is a block already trained on this residual stream, not noise."""
        try:
            self.block.load_state_dict(parts.layers[-1].state_dict())
        except RuntimeError:
            raise MultitokenError(
                f"the trunk's last layer ({type(parts.layers[-1]).__name__}) is not built like "
                "an MTP block (e.g. dense where the MTP blocks are MoE), so the heads cannot "
                "start from it",
                "--init-from-trunk",
            ) from None

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """h^{k-1} [B, T, d] and Emb of the tokens k ahead [B, T, d] -> h^k [B, T, d]."""
        mixed = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return run_layer(self.block, mixed, block_kwargs)


@register
class DeepSeekHeads(DraftVocab, MTPHeads):
    family = "deepseek"

    @classmethod
    def loss_weights(cls, depth: int, lam: float) -> list[float]:
        """DeepSeek-V3 §2.2: ``L = L_main + (λ / D) Σ_k L^k``."""
        return [lam / depth] * depth

    def __init__(self, parts: TrunkParts, config: HeadConfig) -> None:
        super().__init__()
        self.parts = parts
        self.depth = config.depth
        # None (a default not yet resolved against the trunk) reads as off.
        init_from_trunk = bool(getattr(config, "init_from_trunk", False))
        self.mtp = nn.ModuleList(
            DeepSeekModule(parts, index=k, init_from_trunk=init_from_trunk)
            for k in range(config.depth)
        )
        # training-time test past D: the last module also trains reused this many times more
        self.ttt_steps = int(getattr(config, "ttt_steps", 0) or 0)
        self._init_draft_vocab(getattr(config, "draft_vocab", None))

    @property
    def trained_depth(self) -> int:
        return self.depth + self.ttt_steps

    def out_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """OutHead of module k+1: its own norm, then the trunk's unembedding (over the draft
        vocabulary where there is one)."""
        return self.unembed_draft(self.mtp[k].shared_head["norm"](h))

    def forward(
        self, h0: torch.Tensor, tokens: torch.Tensor, block_kwargs: dict, pad_id: int = 0
    ) -> list[torch.Tensor]:
        """Teacher-forced training forward.

        h0: [B, T, d] the trunk's final hidden states over ``tokens[:, :T]``; tokens: [B, T+1]
        (or longer). Module k reads Emb(tokens[:, k : k+T]); positions whose token lies past the
        row get ``pad_id`` — their outputs carry no label, and causal attention keeps them from
        touching earlier positions.

        Past D (``ttt_steps``, the training-time test of EAGLE-3 / HASS), step k = D+1, D+2, ...
        applies module D again to its own previous output h^{k-1} and Emb(tokens[:, k : k+T]),
        exactly as :meth:`draft` reuses it for K > D: decoding then drafts from states the
        module was trained to read, not from states only ever read by the next module.
        """
        T = h0.size(1)
        h = h0
        out = []
        by_kind: dict[str, dict] = {}  # block_kwargs with each block kind's mask
        for k in range(1, self.trained_depth + 1):
            ahead = tokens[:, k : k + T]
            if ahead.size(1) < T:  # [B, T - k + 1] -> [B, T]
                pad = ahead.new_full((ahead.size(0), T - ahead.size(1)), pad_id)
                ahead = torch.cat([ahead, pad], dim=1)
            module = self.mtp[min(k, self.depth) - 1]
            if module.kind not in by_kind:
                by_kind[module.kind] = self.parts.with_kind(block_kwargs, h0, module.kind)
            h = module(h, self.parts.embed(ahead), by_kind[module.kind])
            out.append(self.out_head(min(k, self.depth) - 1, h))
        return out

    def training_logits(self, inputs: HeadInputs) -> list[torch.Tensor]:
        return self(inputs.hidden, inputs.tokens, inputs.block_kwargs, pad_id=inputs.pad_id)

    # -- decoding ---------------------------------------------------------------------------------
    def new_draft_state(self, batch: int) -> DeepSeekDraftState:
        return DeepSeekDraftState(batch, self.parts.embed.weight.device)

    def select_draft_rows(self, state: DeepSeekDraftState, rows: torch.Tensor):
        state.select(rows)
        return state

    def draft(self, state: DeepSeekDraftState, step: Committed, K: int, pick: Pick):
        """Free-running drafting along the causal chain (docs/design.md §Inference, step 1).

        Position p (0-based) of module k reads h^{k-1}_p and Emb(x_{p+k}) and predicts
        x_{p+k+1}. With N tokens committed (the last, x_{N-1}, is the trunk's pending token, so
        h^0 is known up to N-2), draft d_k is module k's output at position N-2, where it reads
        x_{N-2+k} = d_{k-1} (d_0 = the pending token). That is exactly the teacher-forced forward
        over x_0..x_{N-1}, d_1..d_{k-1} read at module k's last position.

        Module k's positions up to N-1-k read only committed tokens: they stay in its KV cache.
        Positions N-k..N-2 read drafts: computed for this step only, never kept. K may exceed D:
        the last module is then applied again, with a cache of its own. Each module runs over
        every row at once (rows padded to the longest); the loop over k is the chain itself.
        Returns (drafts [B, K], q [B, K, V] or None).
        """
        hidden = step.hidden  # [B, n, d]: h^0 of row r at positions start[r] .. + new[r] - 1
        state.ensure(K, hidden)
        device, B = hidden.device, hidden.size(0)
        N = torch.tensor([t.numel() for t in step.tokens])  # [B] committed tokens, on the CPU
        # [B, max N + K]: each row's committed tokens, then its drafts as they are chosen
        ext = nn.functional.pad(
            nn.utils.rnn.pad_sequence(list(step.tokens), batch_first=True), (0, K)
        )
        rows = torch.arange(B, device=device)
        fresh, fresh_len = hidden, torch.tensor(step.new)  # h^{k-1} computed this step
        drafts, qs = [], []
        for k in range(1, K + 1):
            h_out, count = self._chain_step(state, k, ext, N, fresh, fresh_len)
            newest = (count - 1).clamp(min=0).to(device)  # position N-2 of every row
            logits = self.out_head(min(k, self.depth) - 1, h_out[rows, newest])
            token, q_k = pick(self.full_logits(logits))  # over [B, V]
            ext.scatter_(1, (N - 1 + k).to(device)[:, None], token[:, None].to(ext.dtype))
            drafts.append(token)
            qs.append(q_k)
            fresh, fresh_len = h_out, count
        q_all = None if qs[0] is None else torch.stack(qs, dim=1)
        return torch.stack(drafts, dim=1), q_all

    def _chain_step(
        self,
        state: DeepSeekDraftState,
        k: int,
        ext: torch.Tensor,
        N: torch.Tensor,
        fresh: torch.Tensor,
        fresh_len: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Module k over positions done..N-2 of every row, reading h^{k-1} there: what its
        cache had not taken yet (``state.held``) followed by what module k-1 (the trunk, for
        k = 1) computed this step, ``fresh`` [B, *, d] with ``fresh_len`` [B] per row. Commits
        the positions that read committed tokens only; returns h^k over the positions it ran,
        [B, q, d], and each row's count of them [B] (on the CPU)."""
        i = k - 1
        module = self.mtp[min(k, self.depth) - 1]
        kv, done, held, held_len = state.caches[i], state.done[i], state.held[i], state.held_len[i]
        count = N - 1 - done  # [B]
        assert bool((held_len + fresh_len == count).all()), "h^{k-1} must stay contiguous"
        q = max(int(count.max()), 1)
        h_in = _join_rows(held, held_len, fresh, q)  # [B, q, d]
        positions = done.to(ext.device)[:, None] + torch.arange(q, device=ext.device)  # [B, q]
        ahead = ext.gather(1, (positions + k).clamp(max=ext.size(1) - 1))  # x_{p+k}
        kwargs = self.parts.ragged_block_kwargs(h_in, positions, kv, module.kind)
        h_out = module(h_in, self.parts.embed(ahead), kwargs)  # [B, q, d]
        committed = (N - k - done).clamp(min=0)
        kv.commit(committed.tolist())
        # h^{k-1} is committed up to N-2 (the trunk's) or N-k: what module k has not cached
        # of it stays held for the next step
        frontier = N - max(k, 2)
        keep = (frontier - done - committed + 1).clamp(min=0)
        state.held[i], state.held_len[i] = _take_rows(h_in, committed, keep), keep
        state.done[i] = done + committed
        return h_out, count

    def draft_tree(
        self, state: DeepSeekDraftState, step: Committed, K: int, tree: Tree, choose: Choose
    ):
        """Tree drafting along the causal chain: node v's children are module depth(v) + 1's
        candidates at v, so every path of the tree is a chain :meth:`draft` could have drafted.

        In :meth:`draft`'s terms (N tokens committed, the pending one at N-1), module k at a
        node v of depth j sits at position N-1+j-k and reads Emb(v's token) and h^{k-1} of
        module k-1 at v's parent (at the root: module k-1's last committed position, N-k).
        Module k runs once a step over the positions that read committed tokens only (kept in
        its cache, as in :meth:`draft`) followed by the nodes of depth 1..k-1 (this step only),
        each node seeing the cache, those positions, its ancestors and itself. Nodes whose
        position would be negative (prompts shorter than the chain) exist for no one.
        Returns (tokens of nodes 1..N-1 [B, N-1], draft logits at every node but the deepest
        [B, L, V], node i's row of them: i, or filler for the deepest)."""
        hidden = step.hidden  # [B, n, d]
        state.ensure(K, hidden)
        B = hidden.size(0)
        N = torch.tensor([t.numel() for t in step.tokens])  # [B] on the CPU
        ext = nn.utils.rnn.pad_sequence(list(step.tokens), batch_first=True)  # [B, max N]
        tokens = ext.new_zeros(B, tree.size)
        tokens[:, 0] = ext[torch.arange(B, device=ext.device), (N - 1).to(ext.device)]
        fresh, fresh_len = hidden, torch.tensor(step.new)  # h^{k-1} committed this step
        below = hidden.new_zeros(B, tree.size, hidden.size(-1))  # h^{k-1} at every node
        logits_by_level = []
        for k in range(1, K + 1):
            M = tree.levels[k - 1].stop if k <= tree.max_depth else 1  # root + nodes 1..M-1
            here, fresh, fresh_len = self._tree_module_step(
                state, k, ext, N, (fresh, fresh_len), below, tokens, tree, M
            )  # here: h^k at the root and nodes 1..M-1, [B, M, d]
            if k <= tree.max_depth:
                level = tree.levels[k - 1]
                logits = self.full_logits(self.out_head(min(k, self.depth) - 1, here[:, level]))
                logits_by_level.append(logits)  # [B, |level|, V]
                children = choose(logits, tree.widths[k - 1])  # [B, |level|, w]
                for v in tree.levels[k]:
                    tokens[:, v] = children[:, tree.parent[v] - level.start, tree.rank[v]]
            below = torch.cat([here, below[:, M:]], dim=1)
        deepest = tree.levels[-1]
        which = [min(i, deepest.start - 1) for i in range(tree.size)]
        return tokens[:, 1:], torch.cat(logits_by_level, dim=1), which

    def _tree_module_step(
        self,
        state: DeepSeekDraftState,
        k: int,
        ext: torch.Tensor,
        N: torch.Tensor,
        fresh: tuple[torch.Tensor, torch.Tensor],
        below: torch.Tensor,
        tokens: torch.Tensor,
        tree: Tree,
        M: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Module k over each row's c committed positions ``done .. N-1-k`` (padded to q_c)
        and over tree nodes 1..M-1, whose h^{k-1} is ``below`` at their parents. Commits the
        former as :meth:`_chain_step` does. Returns h^k at the root (N-1-k) and at the nodes
        [B, M, d], and h^k over the committed positions [B, q_c, d] with c [B] (CPU)."""
        i = k - 1
        module = self.mtp[min(k, self.depth) - 1]
        kv, done, held, held_len = state.caches[i], state.done[i], state.held[i], state.held_len[i]
        device = ext.device
        c = (N - k - done).clamp(min=0)  # [B]
        # h^{k-1} committed up to N-2 (the trunk's, k = 1) or N-k (module k-1's root)
        assert bool((held_len + fresh[1] == (N - max(k, 2) + 1 - done).clamp(min=0)).all())
        q_c = max(int(c.max()), 1)
        chain = _join_rows(held, held_len, fresh[0], max(q_c, int((c + 1).max())))
        nodes = list(range(1, M))
        h_in = torch.cat([chain[:, :q_c], below[:, [tree.parent[v] for v in nodes]]], dim=1)
        pos_c = done.to(device)[:, None] + torch.arange(q_c, device=device)  # [B, q_c]
        depth = torch.tensor([tree.depth[v] for v in nodes], device=device, dtype=torch.long)
        pos_n = (N - 1 - k).to(device)[:, None] + depth  # [B, M-1]: may be < 0 (no such node)
        ahead = ext.gather(1, (pos_c + k).clamp(max=ext.size(1) - 1))  # x_{p+k}
        ahead = torch.cat([ahead, tokens[:, 1:M]], dim=1)  # [B, q_c + M-1]
        window = self.parts.window(module.kind)
        mask = _tree_module_mask(kv, pos_c, c, pos_n, tree, M, window, h_in.dtype)
        positions = torch.cat([pos_c, pos_n], dim=1).clamp(min=0)
        kwargs = self.parts.block_kwargs(h_in, positions, kv.cache, mask, module.kind)
        h_out = module(h_in, self.parts.embed(ahead), kwargs)  # [B, q_c + M-1, d]
        kv.commit(c.tolist())
        keep = (N - max(k, 2) - done - c + 1).clamp(min=0)  # h^{k-1} not yet taken: at N-k
        state.held[i], state.held_len[i] = _take_rows(chain, c, keep), keep
        state.done[i] = done + c
        rows = torch.arange(h_out.size(0), device=device)
        root = h_out[rows, (c - 1).clamp(min=0).to(device)]  # filler where c = 0
        here = torch.cat([root[:, None], h_out[:, q_c:]], dim=1)
        return here, h_out[:, :q_c], c


def _tree_module_mask(
    kv: RaggedCache,
    pos_c: torch.Tensor,
    c: torch.Tensor,
    pos_n: torch.Tensor,
    tree: Tree,
    M: int,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask [B, 1, q_c + M-1, S + q_c + M-1] for a module forward over the
    committed positions ``pos_c`` [B, q_c] (the first c [B] of each row real) and tree nodes
    1..M-1 at ``pos_n`` [B, M-1] (negative: no such node): every query sees the cache and the
    committed positions up to its own position, a node also its ancestors and itself."""
    device = pos_c.device
    real_c = torch.arange(pos_c.size(1), device=device)[None, :] < c.to(device)[:, None]
    keys = torch.cat([kv.key_positions(), pos_c.masked_fill(~real_c, -1)], dim=1)
    queries = torch.cat([pos_c, pos_n], dim=1)
    seen_before = position_mask(keys, queries, window, dtype)  # [B, 1, q, S + q_c]
    family = tree.ancestors()[1:M, 1:M].to(device)  # [M-1, M-1]: ancestors-or-self
    depth = torch.tensor(tree.depth[1:M], device=device)
    if window is not None:
        family = family & (depth[:, None] - depth[None, :] < window)
    seen = family[None] & (pos_n >= 0)[:, None, :]  # [B, M-1, M-1]
    from_c = torch.zeros(pos_c.size(0), pos_c.size(1), M - 1, dtype=torch.bool, device=device)
    seen = torch.cat([from_c, seen], dim=1)[:, None]  # [B, 1, q, M-1]
    nodes = torch.zeros(seen.shape, dtype=dtype, device=device)
    nodes.masked_fill_(~seen, torch.finfo(dtype).min)
    return torch.cat([seen_before, nodes], dim=-1)


def _join_rows(a: torch.Tensor, a_len: torch.Tensor, b: torch.Tensor, q: int) -> torch.Tensor:
    """[B, q, d]: row r's first ``a_len[r]`` entries of ``a`` [B, Wa, d], then ``b`` [B, Wb, d]
    from its start. Entries past a row's own count are filler (never committed, and causal
    attention keeps them from the positions before)."""
    B, d = b.size(0), b.size(-1)
    if b.size(1) < q:  # room for any row whose a part is empty
        b = torch.cat([b, b.new_zeros(B, q - b.size(1), d)], dim=1)
    j = torch.arange(q, device=b.device)[None, :]
    a_len = a_len.to(b.device)[:, None]
    index = torch.where(j < a_len, j, a.size(1) + j - a_len)  # [B, q] into [a ; b]
    index = index.clamp(max=a.size(1) + b.size(1) - 1)
    both = torch.cat([a, b], dim=1)  # [B, Wa + Wb, d]
    return both.gather(1, index[..., None].expand(-1, -1, d))


def _take_rows(x: torch.Tensor, begin: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, max count, d]: row r's entries ``begin[r] .. begin[r] + count[r] - 1`` of ``x``
    [B, W, d], left-aligned (past a row's count: filler)."""
    width = int(count.max()) if count.numel() else 0
    j = torch.arange(width, device=x.device)[None, :]
    index = (begin.to(x.device)[:, None] + j).clamp(max=max(x.size(1) - 1, 0))  # [B, width]
    return x.gather(1, index[..., None].expand(-1, -1, x.size(-1)))


@dataclass
class DeepSeekDraftState:
    """Decode-time state of the chain, passed explicitly, for each (virtual) module k = i + 1:
    its KV cache, ``done[i]`` [B] (CPU) the positions of each row it holds, and ``held[i]``
    [B, W, d] the committed h^{k-1} at positions ``done[i]`` onwards that it has not taken
    into its cache yet, ``held_len[i]`` [B] (CPU) of them per row (one, between steps, for
    k > 1: h^{k-1} at N-k, whose token x_N is not committed yet)."""

    batch: int
    device: torch.device
    caches: list[RaggedCache] = field(default_factory=list)
    done: list[torch.Tensor] = field(default_factory=list)
    held: list[torch.Tensor] = field(default_factory=list)
    held_len: list[torch.Tensor] = field(default_factory=list)

    def ensure(self, K: int, hidden: torch.Tensor) -> None:
        """An empty chain of K modules at the first draft; the same K at every later one (a
        module left out of a step would miss the states the next one reads)."""
        if self.caches:
            if K != len(self.caches):
                raise ValueError(f"the chain drafted {len(self.caches)} tokens before, not {K}")
            return
        empty = hidden.new_zeros(self.batch, 0, hidden.size(-1))
        self.caches = [RaggedCache(self.batch, self.device) for _ in range(K)]
        self.done = [torch.zeros(self.batch, dtype=torch.long) for _ in range(K)]
        self.held = [empty] * K
        self.held_len = [torch.zeros(self.batch, dtype=torch.long) for _ in range(K)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ([n] long, in that order)."""
        on_cpu = rows.cpu()
        for kv in self.caches:
            kv.select(rows)
        self.done = [done[on_cpu] for done in self.done]
        self.held = [held[rows.to(held.device)] for held in self.held]
        self.held_len = [n[on_cpu] for n in self.held_len]
        self.batch = rows.numel()
