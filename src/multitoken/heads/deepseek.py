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
Drafting keeps each module's own KV cache: :mod:`multitoken.heads.deepseek_state` holds that
state and catches a module up on what each step commits, for chains and trees alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.decode.kvcache import position_mask
from multitoken.errors import MultitokenError
from multitoken.heads.base import (
    ChildSampler,
    Committed,
    DraftSampler,
    HeadInputs,
    MTPHeads,
    register,
)
from multitoken.heads.deepseek_state import DeepSeekDraftState, ModuleInputs
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
            module = self._module(k)
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

    def join_draft_rows(self, state: DeepSeekDraftState, other: DeepSeekDraftState):
        state.join(other)
        return state

    def draft(self, state: DeepSeekDraftState, step: Committed, K: int, sample: DraftSampler):
        """Free-running drafting along the causal chain (docs/design.md §Inference, step 1).

        Position p (0-based) of module k reads h^{k-1}_p and Emb(x_{p+k}) and predicts
        x_{p+k+1}. With N tokens committed (the last, x_{N-1}, is the trunk's pending token, so
        h^0 is known up to N-2), draft d_k is module k's output at position N-2, where it reads
        x_{N-2+k} = d_{k-1} (d_0 = the pending token). That is exactly the teacher-forced forward
        over x_0..x_{N-1}, d_1..d_{k-1} read at module k's last position.

        Module k's positions up to N-1-k read only committed tokens: they stay in its KV cache.
        Positions N-k..N-2 read drafts: computed for this step only, never kept
        (:meth:`DeepSeekDraftState.catch_up`). K may exceed D: the last module is then applied
        again, with a cache of its own. Each module runs over every row at once (rows padded
        to the longest); the loop over k is the chain itself.
        Returns (drafts [B, K], q [B, K, V] or None).
        """
        hidden = step.hidden  # [B, n, d]: h^0 of row r at positions start[r] .. + new[r] - 1
        state.ensure(K, hidden)
        device, B = hidden.device, hidden.size(0)
        N = [t.numel() for t in step.tokens]  # committed tokens per row
        # [B, max N + K]: each row's committed tokens, then its drafts as they are chosen
        ext = nn.functional.pad(
            nn.utils.rnn.pad_sequence(list(step.tokens), batch_first=True), (0, K)
        )
        rows = torch.arange(B, device=device)
        pending = torch.tensor(N, device=device) - 1  # [B] where each row's pending token is
        fresh, fresh_len = hidden, list(step.new)  # h^{k-1} computed this step
        drafts, qs = [], []
        for k in range(1, K + 1):
            forward = functools.partial(self._chain_forward, self._module(k))
            h_out, run = state.catch_up(k, N, ext, fresh, fresh_len, forward, through_drafts=True)
            newest = (run.count_on_device - 1).clamp(min=0)  # position N-2 of every row
            logits = self.out_head(min(k, self.depth) - 1, h_out[rows, newest])
            token, q_k = sample(self.full_logits(logits))  # over [B, V]
            ext.scatter_(1, (pending + k)[:, None], token[:, None].to(ext.dtype))
            drafts.append(token)
            qs.append(q_k)
            fresh, fresh_len = h_out, run.count
        q_all = None if qs[0] is None else torch.stack(qs, dim=1)
        return torch.stack(drafts, dim=1), q_all

    def _module(self, k: int) -> DeepSeekModule:
        """The module drafting k ahead: module k, or past D module D again."""
        return self.mtp[min(k, self.depth) - 1]

    def _chain_forward(self, module: DeepSeekModule, run: ModuleInputs) -> torch.Tensor:
        """``module`` over the positions a step runs (:meth:`DeepSeekDraftState.catch_up`), its
        cache before them: h^k [B, q, d]."""
        kwargs = self.parts.ragged_block_kwargs(run.hidden, run.positions, run.kv, module.kind)
        return module(run.hidden, self.parts.embed(run.ahead), kwargs)

    def draft_tree(
        self,
        state: DeepSeekDraftState,
        step: Committed,
        K: int,
        tree: Tree,
        sample_children: ChildSampler,
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
        B, device = hidden.size(0), hidden.device
        N = [t.numel() for t in step.tokens]  # committed tokens per row
        ext = nn.utils.rnn.pad_sequence(list(step.tokens), batch_first=True)  # [B, max N]
        rows = torch.arange(B, device=device)
        pending = torch.tensor(N, device=device) - 1  # [B] where each row's pending token is
        tokens = ext.new_zeros(B, tree.size)
        tokens[:, 0] = ext[rows, pending]
        depth = torch.tensor(tree.depth, device=device)  # [tree.size] each node's depth
        family = tree.ancestors().to(device)  # [tree.size, tree.size] ancestors-or-self
        fresh, fresh_len = hidden, list(step.new)  # h^{k-1} committed this step
        parent_states = hidden.new_zeros(B, tree.size, hidden.size(-1))  # h^{k-1} at every node
        logits_by_level = []
        for k in range(1, K + 1):
            M = tree.levels[k - 1].stop if k <= tree.max_depth else 1  # root + nodes 1..M-1
            nodes = NodeInputs(
                parent_states[:, [tree.parent[v] for v in range(1, M)]],  # h^{k-1} at their parents
                tokens[:, 1:M],
                (pending - k)[:, None] + depth[1:M],  # may be < 0 (no such node)
                family[1:M, 1:M],
                depth[1:M],
            )
            forward = functools.partial(self._tree_forward, self._module(k), nodes)
            h_out, run = state.catch_up(k, N, ext, fresh, fresh_len, forward, through_drafts=False)
            q_c = run.hidden.size(1)  # h_out: h^k at the committed positions, then the nodes
            root = h_out[rows, (run.count_on_device - 1).clamp(min=0)]  # filler where count = 0
            here = torch.cat([root[:, None], h_out[:, q_c:]], dim=1)  # [B, M, d]
            fresh, fresh_len = h_out[:, :q_c], run.count
            if k <= tree.max_depth:
                level = tree.levels[k - 1]
                logits = self.full_logits(self.out_head(min(k, self.depth) - 1, here[:, level]))
                logits_by_level.append(logits)  # [B, |level|, V]
                children = sample_children(logits, tree.widths[k - 1])  # [B, |level|, w]
                for v in tree.levels[k]:
                    tokens[:, v] = children[:, tree.parent[v] - level.start, tree.rank[v]]
            parent_states = torch.cat([here, parent_states[:, M:]], dim=1)
        deepest = tree.levels[-1]
        logits_row = [min(i, deepest.start - 1) for i in range(tree.size)]
        return tokens[:, 1:], torch.cat(logits_by_level, dim=1), logits_row

    def _tree_forward(
        self, module: DeepSeekModule, nodes: NodeInputs, run: ModuleInputs
    ) -> torch.Tensor:
        """``module`` over its inputs at the committed positions of a step, then at tree nodes
        1..M-1: h^k [B, q_c + M-1, d]."""
        h_in = torch.cat([run.hidden, nodes.hidden], dim=1)
        ahead = torch.cat([run.ahead, nodes.tokens], dim=1)  # [B, q_c + M-1]
        window = self.parts.window(module.kind)
        mask = _tree_module_mask(run, nodes, window, h_in.dtype)
        positions = torch.cat([run.positions, nodes.positions], dim=1).clamp(min=0)
        kwargs = self.parts.block_kwargs(h_in, positions, run.kv.cache, mask, module.kind)
        return module(h_in, self.parts.embed(ahead), kwargs)


@dataclass
class NodeInputs:
    """What module k reads at tree nodes 1..M-1, in every row."""

    hidden: torch.Tensor  # [B, M-1, d] h^{k-1} at each node's parent
    tokens: torch.Tensor  # [B, M-1] each node's token
    positions: torch.Tensor  # [B, M-1] each node's position (negative: no such node)
    family: torch.Tensor  # [M-1, M-1] bool: (i, j) iff node j is node i or an ancestor of it
    depth: torch.Tensor  # [M-1] each node's depth


def _tree_module_mask(
    run: ModuleInputs, nodes: NodeInputs, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, q_c + M-1, S + q_c + M-1] for a module forward over the committed
    positions of ``run`` (the first ``count`` of each row real) and tree nodes 1..M-1: every
    query sees the cache and the committed positions up to its own position, a node also its
    ancestors and itself."""
    pos_c, pos_n = run.positions, nodes.positions
    device = pos_c.device
    real_c = torch.arange(pos_c.size(1), device=device)[None, :] < run.count_on_device[:, None]
    keys = torch.cat([run.kv.key_positions(), pos_c.masked_fill(~real_c, -1)], dim=1)
    queries = torch.cat([pos_c, pos_n], dim=1)
    seen_before = position_mask(keys, queries, window, dtype)  # [B, 1, q, S + q_c]
    family, depth = nodes.family, nodes.depth
    if window is not None:
        family = family & (depth[:, None] - depth[None, :] < window)
    seen = family[None] & (pos_n >= 0)[:, None, :]  # [B, M-1, M-1]
    B, q_c, n_nodes = pos_c.size(0), pos_c.size(1), pos_n.size(1)
    from_c = torch.zeros(B, q_c, n_nodes, dtype=torch.bool, device=device)
    seen = torch.cat([from_c, seen], dim=1)[:, None]  # [B, 1, q, M-1]
    mask = torch.zeros(seen.shape, dtype=dtype, device=device)
    mask.masked_fill_(~seen, torch.finfo(dtype).min)
    return torch.cat([seen_before, mask], dim=-1)
