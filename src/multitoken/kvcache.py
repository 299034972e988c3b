"""A KV cache shared by the rows of a batch whose sequences grow by different amounts.

Each decoding step appends the same number of slots q to every row (the batch is one tensor), but
a row keeps only a prefix of them: the tokens it accepted, the positions its heads committed. The
others become holes: ``keep[r, s]`` is False and the attention mask hides slot s from row r from
then on. Trailing columns no row keeps are cropped off.

While no row has a hole (a batch of one always; a batch whose rows kept the same counts so far)
``keep`` is None: every row's positions are its slot indices, and a forward needs neither a mask
nor position ids — the plain causal path of ``transformers``, with no per-step tensor work and
no device sync here. Once a row has a hole, positions are passed explicitly per row, so rotary
embeddings see each row's true positions whatever its slot layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, cache_utils
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from multitoken.trunk import crop_cache


@dataclass
class RaggedCache:
    batch: int
    device: torch.device
    config: object = None  # the trunk's config, for a cache with one slot per trunk layer
    cache: DynamicCache = field(init=False)
    slots: int = field(init=False, default=0)
    # [B, slots] bool: slot s holds a committed entry of row r; None while no row has a hole
    keep: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.cache = rollback_cache(self.config)

    @property
    def ragged(self) -> bool:
        """Some row has a hole: forwards need :meth:`padding_mask` and explicit positions."""
        return self.keep is not None

    def padding_mask(self, q: int) -> torch.Tensor | None:
        """[B, S + q] mask for a forward of q new slots, or None when no row has a hole."""
        if self.keep is None:
            return None
        new = torch.ones(self.batch, q, dtype=torch.bool, device=self.device)
        return torch.cat([self.keep, new], dim=1)

    def commit(self, valid: torch.Tensor | Sequence[int]) -> None:
        """After a forward of q slots each row keeps a prefix of them: ``valid`` says how many,
        as a list of counts per row (no device work unless a hole appears) or as a [B, q]
        prefix mask. Trailing slots no row keeps are cropped from the cache."""
        counts = valid.sum(dim=1).tolist() if isinstance(valid, torch.Tensor) else list(valid)
        width = max(counts, default=0)
        if self.keep is not None or min(counts, default=0) < width:
            keep = self.keep
            if keep is None:
                keep = torch.ones(self.batch, self.slots, dtype=torch.bool, device=self.device)
            self.keep = torch.cat([keep, prefix_mask(counts, width, self.device)], dim=1)
        self.slots += width
        crop_cache(self.cache, self.slots)


def unrollable_layers(config) -> list[str]:
    """Class names of the cache layers of ``config``'s model that cannot give back their newest
    entries: a recurrent state (linear attention, short convolutions) folds every token in, so
    neither a rejected draft nor a padded prompt can be taken out again."""
    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    return [
        type(layer).__name__
        for layer in rollback_cache(config).layers
        if isinstance(layer, recurrent)
    ]


def rollback_cache(config=None) -> DynamicCache:
    """A ``DynamicCache`` (one slot per layer of ``config``'s model) that can always be cropped
    back. A sliding-window layer drops entries past its window and so cannot roll back; a full
    layer keeps them, and the model's sliding-window mask still hides them."""
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            cache.layers[i] = DynamicLayer()
    return cache


def prefix_mask(counts: list[int], q: int, device: torch.device) -> torch.Tensor:
    """[B, q] bool: row r True on its first ``counts[r]`` slots."""
    return torch.arange(q, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
