"""DeepSeek-V3 sequential MTP modules (DeepSeek-V3 technical report §2.2), keeping the causal chain.

Module k at position i:

    h'^k_i = eh_proj( [ enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i) ] )     eh_proj: 2d -> d
    h^k    = TRM_k(h'^k)                                               one causal block
    P^k_{i+k+1} = Unembed(shared_head.norm(h^k_i))

The paper writes [h ; emb]; released checkpoints and the engines that load them (vLLM, SGLang)
concatenate the embedding first, and so do we, so their weights load without permuting columns.
Parameter names follow the DeepSeek-V3 checkpoint (``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``); ``block`` is a decoder layer of the trunk's own class. ``Emb`` and
``Unembed`` are the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from multitoken.config import HeadConfig
from multitoken.trunk import TrunkParts, crop_cache, run_layer


class DeepSeekModule(nn.Module):
    def __init__(self, parts: TrunkParts, layer_idx: int) -> None:
        super().__init__()
        d = parts.hidden_size
        ref = parts.embed.weight
        self.enorm = parts.new_norm()
        self.hnorm = parts.new_norm()
        self.eh_proj = nn.Linear(2 * d, d, bias=False, device=ref.device, dtype=ref.dtype)
        self.block = parts.new_layer(layer_idx=layer_idx)
        self.shared_head = nn.ModuleDict({"norm": parts.new_norm()})
        parts.model._init_weights(self.eh_proj)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """h^{k-1} [B, T, d] and Emb of the tokens k ahead [B, T, d] -> h^k [B, T, d]."""
        mixed = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return run_layer(self.block, mixed, block_kwargs)


class DeepSeekHeads(nn.Module):
    family = "deepseek"

    def __init__(self, parts: TrunkParts, config: HeadConfig) -> None:
        super().__init__()
        self.parts = parts
        self.depth = config.depth
        # layer_idx 0: at decode time each module has a KV cache of its own, with one layer slot.
        self.mtp = nn.ModuleList(DeepSeekModule(parts, layer_idx=0) for _ in range(config.depth))

    def out_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """OutHead of module k+1: its own norm, then the trunk's unembedding."""
        return self.parts.unembed(self.mtp[k].shared_head["norm"](h))

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

    # -- decoding ---------------------------------------------------------------------------------
    def new_draft_state(self) -> DeepSeekDraftState:
        return DeepSeekDraftState()

    def draft(self, state: DeepSeekDraftState, step, K: int, pick):
        """Free-running drafting along the causal chain (shared/DESIGN.md §Inference, step 1).

        Position p (0-based) of module k reads h^{k-1}_p and Emb(x_{p+k}) and predicts
        x_{p+k+1}. With N tokens committed (the last, x_{N-1}, is the trunk's pending token, so
        h^0 is known up to N-2), draft d_k is module k's output at position N-2, where it reads
        x_{N-2+k} = d_{k-1} (d_0 = the pending token). That is exactly the teacher-forced forward
        over x_0..x_{N-1}, d_1..d_{k-1} read at module k's last position.

        Module k's positions up to N-1-k read only committed tokens: they stay in its KV cache.
        Positions N-k..N-2 read drafts: they are computed for this step and cropped away after.
        K may exceed D: the last module is then applied again, with a cache of its own.
        Returns (drafts [K], q [K, V] or None).
        """
        N = step.tokens.size(1)
        ext = step.tokens[0]  # committed tokens, then the drafts as they are chosen
        state.hist[0] = _append(state.hist.get(0), step.hidden, step.start)
        carried = None  # module k-1's outputs at its draft positions N-k+1..N-2
        drafts, qs = [], []
        for k in range(1, K + 1):
            module = self.mtp[min(k, self.depth) - 1]
            if len(state.caches) < k:
                state.caches.append(DynamicCache())
            cache = state.caches[k - 1]
            c = cache.get_seq_length()  # module k has positions 0..c-1 cached
            frontier = N - 2 if k == 1 else N - k  # last committed position of level k-1
            hist, start = state.hist[k - 1]
            h_in = hist[:, c - start : frontier + 1 - start]  # [1, n_committed_in, d]
            if carried is not None and carried.size(1):
                h_in = torch.cat([h_in, carried], dim=1)
            positions = torch.arange(c, N - 1, device=ext.device)  # c..N-2
            assert h_in.size(1) == positions.numel()
            ahead = ext[c + k : N - 1 + k].unsqueeze(0)  # x_{p+k} for every position p
            kwargs = self.parts.block_kwargs(h_in, positions.unsqueeze(0), cache)
            h_out = module(h_in, self.parts.embed(ahead), kwargs)  # [1, N-1-c, d]
            n_committed = max(0, N - k - c)  # positions c..N-1-k read committed tokens only
            if k < K:
                state.hist[k] = _append(state.hist.get(k), h_out[:, :n_committed], c)
            carried = h_out[:, n_committed:]
            crop_cache(cache, c + n_committed)
            token, q = pick(self.out_head(min(k, self.depth) - 1, h_out[:, -1]))  # [1, V]
            drafts.append(token)
            qs.append(q)
            ext = torch.cat([ext, token])
        _trim(state)
        q = None if qs[0] is None else torch.cat(qs)
        return torch.cat(drafts), q


@dataclass
class DeepSeekDraftState:
    """Decode-time state of the chain, passed explicitly: one KV cache per (virtual) module and,
    for each level l, the committed h^l that module l+1 has not yet taken into its cache."""

    caches: list[DynamicCache] = field(default_factory=list)
    hist: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # l -> (h, start)


def _append(entry, h: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
    if entry is None:
        return h, start
    old, old_start = entry
    assert old_start + old.size(1) == start, "h^l must stay contiguous"
    return torch.cat([old, h], dim=1), old_start


def _trim(state: DeepSeekDraftState) -> None:
    """Drop the h^l that module l+1 has taken into its cache."""
    for level, (h, start) in list(state.hist.items()):
        if level < len(state.caches):
            done = state.caches[level].get_seq_length()  # module level+1 holds positions < done
            if done > start:
                state.hist[level] = (h[:, done - start :], done)
