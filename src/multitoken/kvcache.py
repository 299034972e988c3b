"""A KV cache shared by the rows of a batch whose sequences grow by different amounts.

Each decoding step appends the same number of slots q to every row (the batch is one tensor), but
a row keeps only some of them: the tokens it accepted, the positions its heads committed. The
others become holes: ``keep[r, s]`` is False and the attention mask hides slot s from row r from
then on. Trailing columns no row keeps are cropped off, so a batch of one never has a hole and
runs with no mask at all (the plain causal path). Positions are passed explicitly per row, so
rotary embeddings see each row's true positions whatever its slot layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from multitoken.trunk import crop_cache


@dataclass
class RaggedCache:
    batch: int
    device: torch.device
    config: object = None  # the trunk's config, for a cache with one slot per trunk layer
    cache: DynamicCache = field(init=False)
    keep: torch.Tensor = field(init=False)  # [B, S] bool: slot s holds a committed entry of row r

    def __post_init__(self) -> None:
        self.cache = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            # A sliding-window layer drops entries past its window and so cannot roll back; a
            # full layer keeps them, and the model's sliding-window mask still hides them.
            if isinstance(layer, DynamicSlidingWindowLayer):
                self.cache.layers[i] = DynamicLayer()
        self.keep = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)

    @property
    def slots(self) -> int:
        return self.keep.size(1)

    def padding_mask(self, q: int) -> torch.Tensor | None:
        """[B, S + q] mask for a forward of q new slots, or None when no row has a hole."""
        if bool(self.keep.all()):
            return None
        new = torch.ones(self.batch, q, dtype=torch.long, device=self.device)
        return torch.cat([self.keep.long(), new], dim=1)

    def commit(self, valid: torch.Tensor) -> None:
        """After a forward of q slots: ``valid`` [B, q] says which of them each row keeps (a prefix
        per row). Trailing slots no row keeps are cropped from the cache."""
        keep = torch.cat([self.keep, valid.to(torch.bool)], dim=1)
        used = keep.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if used.numel() else 0
        self.keep = keep[:, :length]
        crop_cache(self.cache, length)


def prefix_mask(counts: list[int], q: int, device: torch.device) -> torch.Tensor:
    """[B, q] bool: row r True on its first ``counts[r]`` slots."""
    return torch.arange(q, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
