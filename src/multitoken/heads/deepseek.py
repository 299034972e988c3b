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

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.trunk import TrunkParts, run_layer


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
        self.mtp = nn.ModuleList(DeepSeekModule(parts, layer_idx=k) for k in range(config.depth))

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
