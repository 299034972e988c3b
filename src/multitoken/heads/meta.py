"""Meta's parallel transformer heads (Gloeckle et al. 2024, "Better & Faster LLMs via MTP").

The trunk is shared up to branch layer b; head k is one transformer layer (the trunk's own layer
class) over the residual stream entering layer b, followed by the trunk's final norm and
unembedding (both shared). With b = L-1 the trunk's last layer is the next-token head and the D
head layers sit beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from multitoken.config import HeadConfig
from multitoken.trunk import TrunkParts, run_layer


class MetaHeads(nn.Module):
    family = "meta"

    def __init__(self, parts: TrunkParts, config: HeadConfig) -> None:
        super().__init__()
        self.parts = parts
        self.depth = config.depth
        self.branch_layer = config.resolved_branch_layer(parts.num_layers)
        # layer_idx k: each head's attention reads/writes slot k of the heads' own cache.
        self.layers = nn.ModuleList(parts.new_layer(layer_idx=k) for k in range(self.depth))

    def head_logits(self, k: int, branch_hidden: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """Head k+1's logits from the stream entering layer b: [B, T, d] -> [B, T, V]."""
        h = run_layer(self.layers[k], branch_hidden, block_kwargs)
        return self.parts.unembed(self.parts.final_norm(h))

    def forward(self, branch_hidden: torch.Tensor, block_kwargs: dict) -> list[torch.Tensor]:
        return [self.head_logits(k, branch_hidden, block_kwargs) for k in range(self.depth)]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters every head also uses (final norm, unembedding)."""
        seen: dict[int, nn.Parameter] = {}
        for module in (self.parts.final_norm, self.parts.unembed):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())
