"""A KV cache shared by the rows of a batch whose sequences grow by different amounts.

Each decoding step appends the same number of slots q to every row (the batch is one tensor), but
a row keeps only a prefix of them: the tokens it accepted, the positions its heads committed. The
others become holes: ``keep[r, s]`` is False and the attention mask hides slot s from row r from
then on. Trailing columns no row keeps are cropped off, and once holes make up a good part of the
cache it is compacted: every row's entries move to the front, in order.

While no row has a hole (a batch of one always; a batch whose rows kept the same counts so far)
``keep`` is None: every row's positions are its slot indices, and a forward needs neither a mask
nor position ids — the plain causal path of ``transformers``, with no per-step tensor work and
no device sync here. Once a row has a hole, positions are passed explicitly per row, so rotary
embeddings see each row's true positions whatever its slot layout, and the mask is built from
positions too: a sliding window counts positions, while ``transformers`` would count slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, cache_utils
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from multitoken.errors import MultitokenError

# Compaction rewrites the whole cache, so it waits until it frees at least this many slots and
# this share of them (attention over holes costs in proportion to their share).
COMPACT_MIN_SLOTS = 16
COMPACT_MIN_SHARE = 0.25

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class RaggedCache:
    batch: int
    device: torch.device
    config: object = None  # the trunk's config, for a cache with one slot per trunk layer
    cache: DynamicCache = field(init=False)
    slots: int = field(init=False, default=0)
    # [B, slots] bool: slot s holds a committed entry of row r; None while no row has a hole
    keep: torch.Tensor | None = field(init=False, default=None)
    kept: list[int] = field(init=False)  # entries each row holds, on the host: no sync to read

    def __post_init__(self) -> None:
        self.cache = rollback_cache(self.config)
        self.kept = [0] * self.batch

    @property
    def ragged(self) -> bool:
        """Some row has a hole: forwards need a mask and explicit positions."""
        return self.keep is not None

    def padding_mask(self, q: int) -> torch.Tensor | None:
        """[B, S + q] mask for a forward of q new slots, or None when no row has a hole."""
        if self.keep is None:
            return None
        new = torch.ones(self.batch, q, dtype=torch.bool, device=self.device)
        return torch.cat([self.keep, new], dim=1)

    def window_mask(
        self, start: torch.Tensor, q: int, window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """[B, 1, q, S + q] additive float mask (0 where seen, dtype-min where not) for a forward
        of q new slots, row r's first at position ``start[r]`` ([B] long): each query sees the
        entries at positions it may see, a ``window`` of positions back (None: all)."""
        offsets = torch.arange(q, device=self.device)
        queries = start[:, None] + offsets  # [B, q]
        keys = torch.cat([self.key_positions(), queries], dim=1)  # [B, S + q]
        return position_mask(keys, queries, window, dtype)

    def key_positions(self) -> torch.Tensor:
        """[B, S] the position each slot holds for its row, -1 for a hole."""
        if self.keep is None:
            return torch.arange(self.slots, device=self.device).expand(self.batch, -1)
        positions = self.keep.long().cumsum(dim=1) - 1
        return positions.masked_fill(~self.keep, -1)

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
        self.kept = [n + c for n, c in zip(self.kept, counts)]
        crop_cache(self.cache, self.slots)
        if self.keep is not None:
            self._compact_if_worth_it()

    def reorder_new(self, order: torch.Tensor, q: int) -> None:
        """Of the q slots the last forward appended, the first ``w`` of row b take what slots
        ``order[b, :w]`` held ([B, w] long, w <= q): a tree's accepted path is moved to the
        front this way, so that :meth:`commit` keeps it as a prefix (the slots past w are
        kept by no row: commit crops them)."""
        w = order.size(1)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            for name in ("keys", "values"):
                full = getattr(layer, name)  # [B, H, S + q, Dh]; MLA's keys and values differ in Dh
                index = order[:, None, :, None].expand(-1, full.size(1), -1, full.size(3))
                start = full.size(2) - q
                full[:, :, start : start + w] = full[:, :, start:].gather(2, index)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ([n] long, in that order): finished rows leave."""
        for layer in self.cache.layers:
            if _filled(layer):  # a layer cropped to no slot still has a row per batch row
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.batch = rows.numel()
        self.kept = [self.kept[r] for r in rows.tolist()]
        if self.keep is not None:
            self.keep = self.keep[rows]
            if min(self.kept) == self.slots:  # every row keeps every slot: no hole left
                self.keep = None
            else:
                self._compact_if_worth_it()

    def extend(self, other: RaggedCache) -> None:
        """Append the rows of ``other`` (a cache of the same trunk) after this one's: requests
        prefilled apart join a running batch (continuous batching). Both sides are padded to
        the longer one's slots; the padding is a trailing hole of the shorter side's rows."""
        slots = max(self.slots, other.slots)
        layers = max(len(self.cache.layers), len(other.cache.layers))
        for cache in (self.cache, other.cache):  # a cache without a config grows layers lazily
            cache.layers.extend(DynamicLayer() for _ in range(layers - len(cache.layers)))
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            parts = [
                _padded(layer, self.batch if i == 0 else other.batch, slots, mine, theirs)
                for i, layer in enumerate((mine, theirs))
            ]
            if parts[0] is None:
                continue  # no row of either side has reached this layer
            keys = torch.cat([parts[0][0], parts[1][0]])
            values = torch.cat([parts[0][1], parts[1][1]])
            if not getattr(mine, "is_initialized", True):
                mine.lazy_initialization(keys, values)
            mine.keys, mine.values = keys, values
        keep = torch.cat([self._keep_mask(slots), other._keep_mask(slots)])
        self.batch += other.batch
        self.kept = self.kept + other.kept
        self.slots = slots
        self.keep = None if min(self.kept) == slots else keep

    def _keep_mask(self, slots: int) -> torch.Tensor:
        """[B, slots] which slots each row keeps, this cache's padded with holes to ``slots``."""
        keep = self.keep
        if keep is None:
            keep = torch.ones(self.batch, self.slots, dtype=torch.bool, device=self.device)
        return torch.nn.functional.pad(keep, (0, slots - self.slots), value=False)

    def compact(self) -> None:
        """Move every row's kept entries to its first slots, in order; trailing holes remain
        only where rows hold fewer entries than the longest."""
        if self.keep is None:
            return
        counts = torch.tensor(self.kept, device=self.device)  # [B]
        width = max(self.kept)
        # a stable sort of "is a hole" lists each row's kept slots first, in slot order
        order = torch.sort((~self.keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            for name in ("keys", "values"):  # MLA's keys and values differ in Dh
                full = getattr(layer, name)  # [B, H, S, Dh] -> [B, H, width, Dh]
                index = order[:, None, :, None].expand(-1, full.size(1), -1, full.size(3))
                setattr(layer, name, full.gather(2, index))
        self.slots = width
        kept = torch.arange(width, device=self.device)[None, :] < counts[:, None]
        self.keep = None if min(self.kept) == width else kept  # no row short of the widest

    def _compact_if_worth_it(self) -> None:
        freed = self.slots - max(self.kept)
        if freed >= COMPACT_MIN_SLOTS and freed >= COMPACT_MIN_SHARE * self.slots:
            self.compact()


def _filled(layer) -> bool:
    """The layer holds a [B, H, S, Dh] tensor per row (S may be 0: cropped back to nothing);
    a layer not run yet holds None or an empty placeholder."""
    return getattr(layer, "keys", None) is not None and layer.keys.dim() == 4


def _padded(layer, batch: int, slots: int, *pair) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``layer``'s keys and values [batch, H, slots, Dh], zeros past its own slots (or all
    zeros, shaped as the other layer of ``pair``'s, where it holds nothing yet); None when
    neither layer of ``pair`` holds anything."""
    like = next((x for x in pair if _filled(x)), None)
    if like is None:
        return None
    out = []
    for name in ("keys", "values"):  # MLA's keys and values differ in Dh
        ref = getattr(like, name)
        if _filled(layer):
            x = getattr(layer, name)
            out.append(torch.nn.functional.pad(x, (0, 0, 0, slots - x.size(2))))
        else:
            out.append(ref.new_zeros(batch, ref.size(1), slots, ref.size(3)))
    return out[0], out[1]


def position_mask(
    keys: torch.Tensor, queries: torch.Tensor, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask [B, 1, q, S] from the position of every key slot ``keys`` [B, S]
    (-1: a hole, never seen) and of every query ``queries`` [B, q]: a query sees the keys at
    its own and earlier positions, within ``window`` positions (transformers' sliding window:
    q - k < window). Float, as eager attention needs; sdpa takes it too."""
    k, qp = keys[:, None, :], queries[:, :, None]  # [B, 1, S], [B, q, 1]
    seen = (k >= 0) & (k <= qp)
    if window is not None:
        seen &= qp - k < window
    mask = torch.zeros(seen.shape, dtype=dtype, device=keys.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


def sliding_window(config) -> int | None:
    """The trunk's attention window where some layer uses one (Mistral, Qwen, Gemma...)."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or (types is not None and SLIDING not in types):
        return None
    return window


def trunk_attention_mask(
    kv: RaggedCache, start: torch.Tensor, q: int, dtype: torch.dtype
) -> torch.Tensor | dict | None:
    """The ``attention_mask`` a trunk forward of q new slots over ``kv`` takes: None without
    holes (the model's own causal mask is exact); with holes, the padding mask, or where some
    layer slides a window, masks by position (:func:`masks_per_kind`)."""
    if not kv.ragged:
        return None
    if sliding_window(kv.config) is None:
        return kv.padding_mask(q)
    return masks_per_kind(kv.config, lambda window: kv.window_mask(start, q, window, dtype))


def masks_per_kind(config, build: Callable[[int | None], torch.Tensor]) -> torch.Tensor | dict:
    """Prepared attention masks for a trunk of ``config``: ``build(window)`` for each kind of
    layer it has (the sliding window for sliding layers, None for full ones) — one
    [B, 1, q, S + q] mask where every layer is of one kind, else a dict by kind, as models with
    mixed ``layer_types`` take prepared masks."""
    window = sliding_window(config)
    kinds = getattr(config.get_text_config(), "layer_types", None) or [SLIDING if window else FULL]
    masks = {kind: build(window if kind == SLIDING else None) for kind in set(kinds)}
    return masks.popitem()[1] if len(masks) == 1 else masks


def unrollable_layers(config) -> list[str]:
    """Class names (sorted, each once) of the cache layers of ``config``'s model that cannot
    give back their newest entries: a recurrent state (linear attention, short convolutions)
    folds every token in, so neither a rejected draft nor a padded prompt can be taken out
    again."""
    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    layers = rollback_cache(config).layers
    return sorted({type(layer).__name__ for layer in layers if isinstance(layer, recurrent)})


def refuse_recurrent(config) -> None:
    """One line, up front, for MTP heads on a trunk whose cache cannot be rolled back: no draft
    could ever be verified on it (plain decoding of it stays possible)."""
    recurrent = unrollable_layers(config)
    if recurrent:
        raise MultitokenError(
            f"this trunk keeps a recurrent state ({', '.join(recurrent)}) that cannot give back "
            "rejected drafts: MTP heads could never be verified on it (decode it with "
            "--no-speculate)",
            "--trunk",
        )


def rollback_cache(config=None) -> DynamicCache:
    """A ``DynamicCache`` (one slot per layer of ``config``'s model) that can always be cropped
    back. A sliding-window layer drops entries past its window and so cannot roll back; a full
    layer keeps them, and the sliding-window mask still hides them."""
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            cache.layers[i] = DynamicLayer()
    return cache


def crop_cache(cache, length: int) -> None:
    """Roll a KV cache back to its first ``length`` positions (``crop`` takes a negative count)."""
    n = cache.get_seq_length()
    if n > length:
        cache.crop(length - n)


def prefix_mask(counts: list[int], q: int, device: torch.device) -> torch.Tensor:
    """[B, q] bool: row r True on its first ``counts[r]`` slots."""
    return torch.arange(q, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
