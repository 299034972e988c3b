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
released module maps onto it: ``multitoken.v3layout`` reads and writes that layout and says how
other loaders' chains differ. ``Emb`` and ``Unembed`` are the trunk's; with a draft vocabulary
(``--draft-vocab N``) ``Unembed`` is used over N tokens only (:mod:`multitoken.heads.draft_vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.heads.base import Committed, HeadInputs, MTPHeads, Pick, register
from multitoken.heads.draft_vocab import DraftVocab
from multitoken.kvcache import RaggedCache, prefix_mask
from multitoken.trunk import TrunkParts, run_layer


class DeepSeekModule(nn.Module):
    def __init__(self, parts: TrunkParts, index: int, init_from_trunk: bool = False) -> None:
        super().__init__()
        d = parts.hidden_size
        ref = parts.embed.weight
        self.enorm = parts.new_norm()
        self.hnorm = parts.new_norm()
        self.eh_proj = nn.Linear(2 * d, d, bias=False, device=ref.device, dtype=ref.dtype)
        self.block = parts.new_layer(mtp_index=index)
        self.shared_head = nn.ModuleDict({"norm": parts.new_norm()})
        parts.model._init_weights(self.eh_proj)
        if init_from_trunk:
            self._copy_last_layer(parts)

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
    keeps_draft_state = True
    drafts_past_depth = True
    default_lambda = "0.3"

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
        self._init_draft_vocab(getattr(config, "draft_vocab", None))

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
        """
        T = h0.size(1)
        h = h0
        out = []
        for k in range(1, self.depth + 1):
            ahead = tokens[:, k : k + T]
            if ahead.size(1) < T:  # [B, T - k + 1] -> [B, T]
                pad = ahead.new_full((ahead.size(0), T - ahead.size(1)), pad_id)
                ahead = torch.cat([ahead, pad], dim=1)
            h = self.mtp[k - 1](h, self.parts.embed(ahead), block_kwargs)
            out.append(self.out_head(k - 1, h))
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
        """Free-running drafting along the causal chain (shared/DESIGN.md §Inference, step 1).

        Position p (0-based) of module k reads h^{k-1}_p and Emb(x_{p+k}) and predicts
        x_{p+k+1}. With N tokens committed (the last, x_{N-1}, is the trunk's pending token, so
        h^0 is known up to N-2), draft d_k is module k's output at position N-2, where it reads
        x_{N-2+k} = d_{k-1} (d_0 = the pending token). That is exactly the teacher-forced forward
        over x_0..x_{N-1}, d_1..d_{k-1} read at module k's last position.

        Module k's positions up to N-1-k read only committed tokens: they stay in its KV cache.
        Positions N-k..N-2 read drafts: computed for this step only, never kept. K may exceed D:
        the last module is then applied again, with a cache of its own.
        Returns (drafts [B, K], q [B, K, V] or None).
        """
        B, device = len(step.tokens), state.device
        N = [t.numel() for t in step.tokens]
        ext = list(step.tokens)  # per row: committed tokens, then the drafts as they are chosen
        for r in range(B):
            state.append(0, r, step.hidden[r, : step.new[r]], step.start[r])
        carried: list[torch.Tensor | None] = [None] * B  # module k-1 at its draft positions
        drafts, qs = [], []
        for k in range(1, K + 1):
            module = self.mtp[min(k, self.depth) - 1]
            kv = state.cache(k)
            done = state.done[k]  # per row: module k holds positions 0..done-1
            rows_in, rows_tok, counts = [], [], []
            for r in range(B):
                c = done[r]
                frontier = N[r] - 2 if k == 1 else N[r] - k  # last committed position of h^{k-1}
                h_in = state.read(k - 1, r, c, frontier + 1)
                if carried[r] is not None:
                    h_in = torch.cat([h_in, carried[r]])
                rows_in.append(h_in)  # [N_r - 1 - c, d]: positions c..N_r-2
                rows_tok.append(ext[r][c + k : N[r] - 1 + k])  # x_{p+k} for those positions
                counts.append(N[r] - 1 - c)
            q = max(counts)
            h_in = torch.stack([_pad(x, q) for x in rows_in])  # [B, q, d]
            ahead = torch.stack([_pad(x, q) for x in rows_tok])  # [B, q]
            positions = torch.tensor(done, device=device)[:, None] + torch.arange(q, device=device)
            kwargs = self.parts.block_kwargs(h_in, positions, kv.cache, kv.padding_mask(q))
            h_out = module(h_in, self.parts.embed(ahead), kwargs)  # [B, q, d]
            committed = [max(0, N[r] - k - done[r]) for r in range(B)]
            kv.commit(prefix_mask(committed, q, device))
            for r in range(B):
                if k < K:
                    state.append(k, r, h_out[r, : committed[r]], done[r])
                carried[r] = h_out[r, committed[r] : counts[r]]
                done[r] += committed[r]
            newest = torch.tensor(counts, device=device) - 1
            logits = self.out_head(
                min(k, self.depth) - 1, h_out[torch.arange(B, device=device), newest]
            )
            token, q_k = pick(self.full_logits(logits))  # over [B, V]
            drafts.append(token)
            qs.append(q_k)
            ext = [torch.cat([ext[r], token[r : r + 1]]) for r in range(B)]
        state.trim()
        q_all = None if qs[0] is None else torch.stack(qs, dim=1)
        return torch.stack(drafts, dim=1), q_all


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad the first dimension with zeros (slots past a row's count are never kept)."""
    if x.size(0) == length:
        return x
    return torch.cat([x, x.new_zeros((length - x.size(0), *x.shape[1:]))])


@dataclass
class DeepSeekDraftState:
    """Decode-time state of the chain, passed explicitly: a KV cache per (virtual) module k with
    ``done[k][r]`` committed positions of row r, and for each level l the committed h^l of each
    row that module l+1 has not yet taken into its cache."""

    batch: int
    device: torch.device
    caches: dict[int, RaggedCache] = field(default_factory=dict)
    done: dict[int, list[int]] = field(default_factory=dict)
    hist: dict[int, list[tuple[torch.Tensor, int] | None]] = field(default_factory=dict)

    def cache(self, k: int) -> RaggedCache:
        if k not in self.caches:
            self.caches[k] = RaggedCache(self.batch, self.device)
            self.done[k] = [0] * self.batch
        return self.caches[k]

    def append(self, level: int, row: int, h: torch.Tensor, start: int) -> None:
        """Add h^level at positions start.. for a row (contiguous with what is held)."""
        rows = self.hist.setdefault(level, [None] * self.batch)
        if rows[row] is None:
            rows[row] = (h, start)
            return
        old, old_start = rows[row]
        assert old_start + old.size(0) == start, "h^l must stay contiguous"
        rows[row] = (torch.cat([old, h]), old_start)

    def read(self, level: int, row: int, begin: int, end: int) -> torch.Tensor:
        h, start = self.hist[level][row]
        return h[begin - start : end - start]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ([n] long, in that order)."""
        keep = rows.tolist()
        for kv in self.caches.values():
            kv.select(rows)
        self.done = {k: [done[r] for r in keep] for k, done in self.done.items()}
        self.hist = {level: [held[r] for r in keep] for level, held in self.hist.items()}
        self.batch = len(keep)

    def trim(self) -> None:
        """Drop the h^l that module l+1 has taken into its cache."""
        for level, rows in self.hist.items():
            if level + 1 not in self.done:
                continue
            for r, entry in enumerate(rows):
                if entry is not None and self.done[level + 1][r] > entry[1]:
                    h, start = entry
                    cut = self.done[level + 1][r]
                    rows[r] = (h[cut - start :], cut)
