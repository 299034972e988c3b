"""Checkpoints: safetensors + JSON, written atomically, loaded with one-line errors.

A run folder holds ``checkpoints/step-NNNNNNN/`` folders and a ``latest`` file naming the newest.
Each checkpoint is first written to a hidden temporary folder and renamed into place, then
``latest`` is replaced (temp file + rename), so a crash at any moment leaves the previous
checkpoint intact and pointed to. Inside a checkpoint::

    trunk/               the trunk as a plain transformers folder with its tokenizer;
                         absent when a pretrained --trunk was frozen: multitoken.json then names
                         its folder (or GGUF file), so heads-only runs do not copy a large model
                         every save
    heads.safetensors    the MTP heads alone, and heads.json, their config and the signature of
                         the trunk they fit: the checkpoint folder is itself a portable heads
                         folder (multitoken.io.headfile)
    multitoken.json      head config, tokenizer description, training config, step
    tokenizer.json       when the run used a BPE tokenizer
    optimizer.pt         AdamW state (for --resume)
    state.json           step, data-stream positions, RNG seeds (for --resume)
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from multitoken.errors import MultitokenError, first_line
from multitoken.io.atomic import atomic_folder, write_json_atomic, write_text_atomic
from multitoken.io.gguf import is_gguf
from multitoken.io.headfile import is_heads_folder, load_heads, save_heads
from multitoken.io.tokenizer_files import write_hf_tokenizer
from multitoken.model import MTPModel
from multitoken.text.tokenizer import (
    Tokenizer,
    load_gguf_tokenizer,
    load_tokenizer,
    tokenizer_from_saved,
)
from multitoken.trunk import load_trunk, quiet_transformers

FORMAT_VERSION = 2


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: MTPModel,
    tokenizer: Tokenizer,
    train_config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    keep: int = 2,
    trunk_ref: Path | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-N`` atomically, point ``latest`` at it, prune old ones.
    With ``trunk_ref`` (a frozen pretrained trunk) the trunk is not copied, only referred to."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    # re-saving the same step (e.g. the final save after a periodic one) replaces it
    with atomic_folder(final, replace=True) as tmp:
        if trunk_ref is None:  # trunk/ is a complete model folder, usable as a --trunk
            with quiet_transformers():
                model.trunk.save_pretrained(tmp / "trunk", safe_serialization=True)
            write_hf_tokenizer(tokenizer, tmp / "trunk")
        save_heads(model, tmp)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "heads": model.head_config.__dict__,
            "tokenizer": tokenizer.save(tmp),
            "train_config": train_config,
            "trunk_ref": None if trunk_ref is None else str(Path(trunk_ref).resolve()),
        }
        write_json_atomic(tmp / "multitoken.json", meta)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if state is not None:
            write_json_atomic(tmp / "state.json", state)
    write_text_atomic(run_dir / "latest", f"checkpoints/{final.name}\n")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_run_or_checkpoint(path: str | Path) -> bool:
    """A multitoken checkpoint or run folder (anything else may be a plain model folder or a
    GGUF file)."""
    return (Path(path) / "multitoken.json").is_file() or (Path(path) / "latest").is_file()


def resolve_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A checkpoint folder, or a run folder whose ``latest`` names one."""
    p = Path(path)
    if (p / "multitoken.json").is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / "multitoken.json").is_file():
            return target
        raise MultitokenError(f"{latest} points to a missing checkpoint {target}", flag)
    if not p.exists():
        raise MultitokenError(f"no such checkpoint: {p}", flag)
    raise MultitokenError(f"{p} is not a multitoken checkpoint or run folder", flag)


def read_meta(ckpt: Path, flag: str = "--checkpoint") -> dict:
    try:
        meta = json.loads((ckpt / "multitoken.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MultitokenError(
            f"{ckpt}/multitoken.json is corrupt or unreadable ({exc})", flag
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise MultitokenError(
            f"{ckpt}/multitoken.json is not a format-{FORMAT_VERSION} multitoken checkpoint", flag
        )
    return meta


def checkpoint_trunk(path: str | Path, flag: str = "--checkpoint") -> PreTrainedModel:
    """The trunk of a checkpoint or run folder, wherever it lives."""
    ckpt = resolve_checkpoint(path, flag)
    return _checkpoint_trunk(ckpt, read_meta(ckpt, flag), flag)


def _checkpoint_trunk(ckpt: Path, meta: dict, flag: str) -> PreTrainedModel:
    """The trunk a checkpoint holds, or the frozen one it refers to."""
    ref = meta.get("trunk_ref")
    folder = ckpt / "trunk" if ref is None else Path(ref)  # a referred trunk may be a GGUF file
    there = folder.is_file() if is_gguf(folder) else (folder / "config.json").is_file()
    if ref is not None and not there:
        raise MultitokenError(
            f"{ckpt} holds heads trained on the frozen trunk {folder}, which is gone; attach "
            f"them to a copy of it with --checkpoint TRUNK --heads {ckpt}",
            flag,
        )
    try:
        return load_trunk(folder)
    except MultitokenError as exc:
        raise MultitokenError(
            f"checkpoint {ckpt} has a damaged trunk: {exc.message}", flag
        ) from None


def load_checkpoint(
    path: str | Path,
    flag: str = "--checkpoint",
    trunk_only_ok: bool = False,
    heads: str | Path | None = None,
) -> tuple[MTPModel, Tokenizer, dict]:
    """Load model, tokenizer and metadata; any damage is a one-line :class:`MultitokenError`.

    ``path`` is a checkpoint, a run folder (its ``latest``), or — with ``trunk_only_ok``, for
    decoding — a plain transformers model folder with its tokenizer (a model in the DeepSeek-V3
    layout loads with its MTP modules as deepseek heads, any other without heads) or a GGUF
    file. ``heads`` (a heads folder, checkpoint or run) attaches portable heads to the trunk
    found at ``path``."""
    p = Path(path)
    plain = not is_run_or_checkpoint(p)
    if plain and (trunk_only_ok or heads is not None) and is_gguf(p):
        trunk = load_trunk(p, flag)  # first: a damaged file is named as such
        tokenizer = load_gguf_tokenizer(p, flag)
        model, meta = MTPModel(trunk, None), {"heads": None, "train_config": {}}
    elif plain and (trunk_only_ok or heads is not None) and (p / "config.json").is_file():
        from multitoken.io.v3layout import load_v3_layout, mtp_depth

        try:
            tokenizer = load_tokenizer(str(p))
        except MultitokenError as exc:
            raise MultitokenError(
                f"a model folder needs its tokenizer: {exc.message}", flag
            ) from None
        if heads is None and mtp_depth(p) > 0:
            model = load_v3_layout(p)
        else:
            model = MTPModel(load_trunk(p), None)
        meta = {"heads": None, "train_config": {}}
    else:
        ckpt = resolve_checkpoint(path, flag)
        meta = read_meta(ckpt, flag)
        tokenizer = tokenizer_from_saved(ckpt, meta["tokenizer"])
        trunk = _checkpoint_trunk(ckpt, meta, flag)
        if heads is None and is_heads_folder(ckpt):
            model = load_heads(trunk, ckpt, flag)
        elif heads is None and not trunk_only_ok:
            raise MultitokenError(f"{ckpt} holds no heads (heads.json)", flag)
        else:
            model = MTPModel(trunk, None)
    if heads is not None:
        folder = Path(heads)
        if not is_heads_folder(folder):
            folder = resolve_checkpoint(folder, "--heads")
        model = load_heads(model.trunk, folder, "--heads")
    if model.heads is not None:
        meta = {**meta, "heads": model.head_config.__dict__}
    return model, tokenizer, meta


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer state, trainer state) for --resume."""
    try:
        optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, RuntimeError, json.JSONDecodeError, EOFError, pickle.UnpicklingError) as exc:
        raise MultitokenError(
            f"{ckpt} has no usable optimizer/trainer state ({first_line(exc)})", "--resume"
        ) from None
    return optim_state, state
