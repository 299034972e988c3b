"""Frozen-trunk feature cache: heads-only training runs the trunk once per training row.

With ``--freeze-trunk`` the trunk's states over a row never change, yet every epoch would run
the trunk again to get them. As Medusa and EAGLE precompute their draft heads' inputs, the
trainer keeps them on disk instead: the first time a row is seen the trunk runs, and what the
heads read of it is written to the cache; later epochs (and every validation pass after the
first) read it back.

What a row keeps (one row = ``seq_len + 1`` tokens, the model reading the first ``T``):

    states   [T, d]  h^0 after the final norm (bpd, deepseek), or the residual stream entering
                     the branch layer b (meta); the decoder-layer arguments meta and deepseek
                     heads also need (causal mask, rotary cos/sin) are rebuilt from positions
                     0..T-1 (``TrunkParts.block_kwargs``), not stored
    main     [3]     the trunk's next-token loss summed over the row, its top-1 hits and the
                     number of labels: the main loss and accuracy of any batch of rows follow,
                     so the reported trunk figures stay the real ones without the trunk's logits
    topk_ids [T, k]  int32: the trunk's k likeliest tokens at each position, likeliest first
                     (multitoken.training.losses.trunk_top_k; k = ``--soft-top-k``). The first is the
                     trunk's greedy token (``--labels trunk`` trains the heads on the trunk's
                     greedy path: multitoken.training.losses.greedy_path_labels)
    topk_probs [T, k]  fp16: their probabilities, renormalised over those k (``--labels soft``
                     trains head k at position i on the distribution at i+k:
                     multitoken.training.losses.soft_labels). 6k bytes a position: at k = 16, 96 bytes
                     against 1,152 for SmolLM2's bf16 states (d = 576)
    tokens   [T+1]   the row itself, checked against the row asked for on every read

Key: a 128-bit BLAKE2b digest of the row's tokens. The cache is content-addressed, so the data,
tokenizer and ``--seq-len`` cannot make it stale: a row is the same row whatever produced it.
What decides a row's states besides its tokens is the FINGERPRINT: the trunk's shape and
weights (a digest of every tensor's leading elements and of its sums), which states are kept
(h^0 or layer b's input), the storage and compute precision, device type, attention
implementation, torch version and k. Each fingerprint has a folder of its own under the cache
folder, so a cache made for anything else is never read (and is kept for when it applies
again); ``fingerprint.json`` in it is checked on opening.

Shards: ``shard-r{rank}-{n}.safetensors`` of up to ~64 MiB, written whole (temporary file +
rename) when full and whenever the trainer saves a checkpoint, so a resumed run finds every row
written before its checkpoint. Each row carries a CRC-32 of its key and bytes, checked on every read:
a damaged or truncated shard is a :class:`MultitokenError` naming the file, never silently
used. Bounded: once the shards reach ``cap_bytes`` (``--feature-cache-gb``), further rows are
computed live every time they come round. Storage is bf16 by default (the states rounded to
bf16, relative error at most 2^-9: the residual stream stays fp32 even under bf16 autocast) or
fp32 (bit-exact). Rows computed live are rounded the same way, so the heads see the same inputs
whether a row was just computed or read back.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from multitoken.config import SOFT_TOP_K
from multitoken.errors import MultitokenError, first_line
from multitoken.io.atomic import atomic_path, write_json_atomic
from multitoken.model import MTPModel, TrunkFeatures
from multitoken.training.losses import IGNORE, shift_labels, trunk_top_k

FORMAT = 3  # 2: rows keep the trunk's greedy tokens; 3: its top-k tokens and probabilities
STORAGE = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHARD_BYTES = 64 << 20
FLAG = "--feature-cache-dir"


def row_key(row: torch.Tensor) -> bytes:
    """The cache key of one row of token ids (int32 on the CPU)."""
    return hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest()


def cached_state(model: MTPModel) -> str:
    """Which trunk state the heads read: ``h0``, or ``branch:b`` for meta heads."""
    return f"branch:{model.heads.branch_layer}" if model.heads.reads_branch else "h0"


def trunk_fingerprint(model: MTPModel, storage: str, compute: str, top_k: int = SOFT_TOP_K) -> dict:
    """Everything besides a row's tokens that decides what the cache holds for it."""
    from multitoken.io.headfile import trunk_signature

    signature = trunk_signature(model.trunk)
    sums = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.trunk.state_dict().items()):
            t = tensor.detach()
            sums.update(f"{name}:{t.sum(dtype=torch.float64).item()!r}".encode())
            sums.update(f":{t.abs().sum(dtype=torch.float64).item()!r}".encode())
    device = model.parts.embed.weight.device.type
    return {
        "format": FORMAT,
        "trunk": signature["fields"],
        "weights_digest": signature["weights_digest"],
        "weights_sums": sums.hexdigest()[:16],
        "state": cached_state(model),
        "storage": storage,
        "compute": compute,
        "device": device,
        "attention": str(getattr(model.trunk.config, "_attn_implementation", None)),
        "torch": torch.__version__,
        "top_k": top_k,
    }


@torch.no_grad()
def live_features(model: MTPModel, tokens: torch.Tensor, top_k: int = SOFT_TOP_K) -> TrunkFeatures:
    """Run the trunk over rows ``tokens`` [B, T+1] (inputs ``tokens[:, :T]``): the states the
    heads read, the trunk's own loss per row and its ``top_k`` likeliest tokens at each
    position with their renormalised probabilities (the greedy token is the first). Runs under
    the caller's autocast."""
    branch = model.heads.branch_layer if model.heads.reads_branch else None
    out = model.trunk_forward(tokens[:, :-1], branch)
    states = out.branch_hidden if branch is not None else out.hidden
    labels = shift_labels(tokens, 0)
    main = torch.zeros(tokens.size(0), 3, device=tokens.device)
    ids, probs = [], []
    for r in range(tokens.size(0)):  # row by row: one row's fp32 logits at a time
        logits = out.logits[r].float()
        valid = labels[r] != IGNORE
        main[r, 0] = F.cross_entropy(logits, labels[r], ignore_index=IGNORE, reduction="sum")
        main[r, 1] = ((logits.argmax(-1) == labels[r]) & valid).sum()
        main[r, 2] = valid.sum()
        row_ids, row_probs = trunk_top_k(logits, top_k)  # [T, k] each
        ids.append(row_ids)
        probs.append(row_probs)
    topk_ids, topk_probs = torch.stack(ids), torch.stack(probs)  # [B, T, k]
    return TrunkFeatures(
        states, main[:, 0], main[:, 1], main[:, 2], topk_ids[..., 0], topk_ids, topk_probs
    )


def _crc(key: bytes, *tensors: torch.Tensor) -> int:
    crc = zlib.crc32(key)
    for t in tensors:
        crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)
    return crc


@dataclass
class _Shard:
    path: Path
    handle: object  # safetensors safe_open
    crc: torch.Tensor  # [R] int64


@dataclass
class CacheStats:
    hits: int = 0  # rows read from the cache
    computed: int = 0  # rows the trunk ran for
    stored: int = 0  # of those, rows written to the cache
    held: int = 0  # rows the cache holds (all ranks' shards at opening, plus this rank's since)
    bytes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Pending:
    keys: list[bytes] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)
    main: list[torch.Tensor] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    topk_probs: list[torch.Tensor] = field(default_factory=list)
    bytes: int = 0


class FeatureCache:
    """The on-disk cache of one trunk's states, for one rank of a run (module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        model: MTPModel,
        cap_bytes: int,
        storage: str = "bf16",
        compute: str = "fp32",
        rank: int = 0,
        world_size: int = 1,
        shard_bytes: int = SHARD_BYTES,
        top_k: int = SOFT_TOP_K,
    ) -> None:
        if storage not in STORAGE:
            raise MultitokenError(
                f"unknown storage {storage!r} (choose from {', '.join(STORAGE)})",
                "--feature-cache-dtype",
            )
        if model.trunk_trainable:
            raise MultitokenError("the feature cache needs a frozen trunk", "--freeze-trunk")
        self.dtype = STORAGE[storage]
        self.cap_bytes = cap_bytes // max(1, world_size)
        self.shard_bytes = shard_bytes
        self.rank = rank
        self.top_k = top_k
        self.fingerprint = trunk_fingerprint(model, storage, compute, top_k)
        text = json.dumps(self.fingerprint, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder = Path(folder) / self.key
        self.stats = CacheStats()
        self._index: dict[bytes, tuple[int, int]] = {}  # key -> (shard, row); shard -1: pending
        self._shards: list[_Shard] = []
        self._pending = _Pending()
        self._next_shard = 0
        self._open()

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MultitokenError(f"cannot create {self.folder}: {exc.strerror}", FLAG) from None
        meta = self.folder / "fingerprint.json"
        if meta.is_file():
            try:
                found = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise MultitokenError(f"{meta} is corrupt or unreadable ({exc})", FLAG) from None
            if found != self.fingerprint:
                raise MultitokenError(
                    f"{meta} does not describe this trunk and settings; delete {self.folder}",
                    FLAG,
                )
        else:
            write_json_atomic(meta, self.fingerprint, sort_keys=True)
        for stale in self.folder.glob(f".shard-r{self.rank}-*.tmp"):  # a killed writer's
            stale.unlink(missing_ok=True)
        mine = f"shard-r{self.rank}-"
        for path in sorted(self.folder.glob("shard-r*-*.safetensors")):
            self._add_shard(path)
            if path.name.startswith(mine):
                number = path.stem.removeprefix(mine)
                if number.isdigit():
                    self._next_shard = max(self._next_shard, int(number) + 1)

    def _add_shard(self, path: Path) -> None:
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            keys = handle.get_tensor("keys")
            crc = handle.get_tensor("crc")
            rows = handle.get_slice("states").get_shape()[0]
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
            raise MultitokenError(self._damaged(path, first_line(exc)), FLAG) from None
        if (
            meta.get("fingerprint") != self.key
            or meta.get("format") != str(FORMAT)
            or len(keys) != rows
            or len(crc) != rows
        ):
            raise MultitokenError(self._damaged(path, "its header does not match"), FLAG)
        index = len(self._shards)
        self._shards.append(_Shard(path, handle, crc))
        for r, key in enumerate(keys):
            self._index.setdefault(bytes(key.tolist()), (index, r))
        self.stats.held += rows
        self.stats.bytes += path.stat().st_size

    def _damaged(self, path: Path, why: str) -> str:
        return (
            f"feature cache shard {path} is damaged ({why}); delete it and the cache recomputes "
            "its rows"
        )

    # -- reading and writing -------------------------------------------------------------------
    def _read(self, key: bytes, row: torch.Tensor):
        """(states [T, d], main [3], topk_ids [T, k], topk_probs [T, k]) of a cached row, or
        None."""
        where = self._index.get(key)
        if where is None:
            return None
        shard_index, r = where
        if shard_index < 0:
            p = self._pending
            return p.states[r], p.main[r], p.topk_ids[r], p.topk_probs[r]
        shard = self._shards[shard_index]
        try:
            tokens = shard.handle.get_slice("tokens")[r : r + 1][0]
            states = shard.handle.get_slice("states")[r : r + 1][0]
            main = shard.handle.get_slice("main")[r : r + 1][0]
            ids = shard.handle.get_slice("topk_ids")[r : r + 1][0]
            probs = shard.handle.get_slice("topk_probs")[r : r + 1][0]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MultitokenError(self._damaged(shard.path, first_line(exc)), FLAG) from None
        if _crc(key, tokens, states, main, ids, probs) != int(shard.crc[r]):
            raise MultitokenError(self._damaged(shard.path, f"row {r} fails its checksum"), FLAG)
        if not torch.equal(tokens, row):
            raise MultitokenError(self._damaged(shard.path, f"row {r} holds other tokens"), FLAG)
        return states, main, ids, probs.float()  # exact: the fp32 held in memory (trunk_top_k)

    def _store(self, key: bytes, row: torch.Tensor, states, main, ids, probs) -> None:
        size = len(key) + row.numel() * 4 + 3 * 4 + 8 + probs.numel() * 2  # probs: fp16
        for t in (states, ids):
            size += t.numel() * t.element_size()
        if key in self._index or self.stats.bytes + size > self.cap_bytes:
            return  # a row seen twice in one batch is held once
        p = self._pending
        if p.tokens and p.tokens[0].shape != row.shape:  # one row length per shard
            self.flush()
        self._index[key] = (-1, len(p.keys))
        p.keys.append(key)
        p.tokens.append(row)
        p.states.append(states)
        p.main.append(main)
        p.topk_ids.append(ids)
        p.topk_probs.append(probs)
        p.bytes += size
        self.stats.bytes += size
        self.stats.stored += 1
        self.stats.held += 1
        if p.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the rows held in memory as one shard (temporary file, then rename)."""
        p = self._pending
        if not p.keys:
            return
        tokens, states, main = torch.stack(p.tokens), torch.stack(p.states), torch.stack(p.main)
        ids, probs = torch.stack(p.topk_ids), torch.stack(p.topk_probs).half()  # exact
        crc = torch.tensor([_crc(*row) for row in zip(p.keys, tokens, states, main, ids, probs)])
        keys = torch.tensor([list(k) for k in p.keys], dtype=torch.uint8)
        name = f"shard-r{self.rank}-{self._next_shard:06d}.safetensors"
        self._next_shard += 1
        final = self.folder / name
        tensors = {"keys": keys, "tokens": tokens, "states": states, "main": main, "crc": crc}
        tensors.update(topk_ids=ids, topk_probs=probs)
        with atomic_path(final) as tmp:  # a killed writer's is .<name>.<random>.tmp
            save_file(tensors, str(tmp), metadata={"fingerprint": self.key, "format": str(FORMAT)})
        before = self.stats.bytes - p.bytes
        self.stats.held -= len(p.keys)
        self._pending = _Pending()
        for key in p.keys:  # re-pointed at the shard by _add_shard
            del self._index[key]
        self.stats.bytes = before
        self._add_shard(final)

    def close(self) -> None:
        self.flush()

    # -- the trainer's entry point -------------------------------------------------------------
    def features(self, model: MTPModel, tokens: torch.Tensor) -> TrunkFeatures:
        """The trunk's features over rows ``tokens`` [B, T+1]: read where cached, else computed
        (under the caller's autocast) and stored while the cache has room."""
        rows = tokens.detach().to("cpu", torch.int32)
        keys = [row_key(r) for r in rows]
        found = [self._read(k, r) for k, r in zip(keys, rows)]
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.hits += len(rows) - len(missing)
        if missing:
            live = live_features(model, tokens[missing], self.top_k)
            states = live.states.to("cpu", self.dtype)
            main = torch.stack([live.main_nll, live.main_hits, live.main_count], 1).cpu()
            ids = live.topk_ids.to("cpu", torch.int32)
            probs = live.topk_probs.cpu()  # float32, stored as fp16 (exact: trunk_top_k)
            for j, i in enumerate(missing):
                found[i] = tuple(t[j].clone() for t in (states, main, ids, probs))
                self._store(keys[i], rows[i], *found[i])
            self.stats.computed += len(missing)
        device = tokens.device
        states = torch.stack([f[0] for f in found]).to(device).float()
        main = torch.stack([f[1] for f in found]).to(device)
        ids = torch.stack([f[2] for f in found]).to(device, torch.long)  # [B, T, k]
        probs = torch.stack([f[3] for f in found]).to(device)  # [B, T, k]
        return TrunkFeatures(states, main[:, 0], main[:, 1], main[:, 2], ids[..., 0], ids, probs)
