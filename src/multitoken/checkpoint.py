"""Checkpoints: safetensors + JSON, written atomically, loaded with one-line errors.

A run folder holds ``checkpoints/step-NNNNNNN/`` folders and a ``latest`` file naming the newest.
Each checkpoint is first written to a hidden temporary folder and renamed into place, then
``latest`` is replaced (temp file + rename), so a crash at any moment leaves the previous
checkpoint intact and pointed to. Inside a checkpoint::

    trunk/               the trunk as a plain transformers folder (config.json, model.safetensors)
    heads.safetensors    the MTP heads alone (a small file to ship beside the trunk)
    multitoken.json      head config, tokenizer description, training config, step
    tokenizer.json       when the run used a BPE tokenizer
    optimizer.pt         AdamW state (for --resume)
    state.json           step, data-stream positions, RNG seeds (for --resume)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitoken.config import HeadConfig
from multitoken.errors import MultitokenError
from multitoken.model import MTPModel
from multitoken.tokenizer import Tokenizer, tokenizer_from_saved
from multitoken.trunk import load_trunk, quiet_transformers

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder + rename: readers see the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: MTPModel,
    tokenizer: Tokenizer,
    train_config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-N`` atomically, point ``latest`` at it, prune old ones."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-step-{step:07d}-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with quiet_transformers():
            model.trunk.save_pretrained(tmp / "trunk", safe_serialization=True)
        heads = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
        save_file(heads, str(tmp / "heads.safetensors"), metadata={"family": model.family})
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "heads": model.head_config.__dict__,
            "tokenizer": tokenizer.save(tmp),
            "train_config": train_config,
        }
        write_json_atomic(tmp / "multitoken.json", meta)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if state is not None:
            write_json_atomic(tmp / "state.json", state)
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(run_dir / "latest", f"checkpoints/{final.name}\n")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_checkpoint(
    path: str | Path, flag: str = "--checkpoint", trunk_only_ok: bool = False
) -> tuple[MTPModel, Tokenizer, dict]:
    """Load model, tokenizer and metadata; any damage is a one-line :class:`MultitokenError`.

    With ``trunk_only_ok`` (decoding), a plain transformers model folder with a tokenizer.json,
    or a checkpoint whose heads file is absent, loads as a model without heads."""
    p = Path(path)
    plain = not (p / "multitoken.json").exists() and not (p / "latest").exists()
    if trunk_only_ok and plain and (p / "config.json").is_file():
        from multitoken.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(str(p))
        except MultitokenError as exc:
            raise MultitokenError(
                f"a model folder without heads needs its tokenizer: {exc}", flag
            ) from None
        return MTPModel(load_trunk(p), None), tokenizer, {"heads": None}
    ckpt = resolve_checkpoint(path, flag)
    meta = read_meta(ckpt, flag)
    tokenizer = tokenizer_from_saved(ckpt, meta["tokenizer"])
    try:
        trunk = load_trunk(ckpt / "trunk")
    except MultitokenError as exc:
        raise MultitokenError(f"checkpoint {ckpt} has a damaged trunk: {exc}", flag) from None
    if trunk_only_ok and not (ckpt / "heads.safetensors").exists():
        return MTPModel(trunk, None), tokenizer, {**meta, "heads": None}
    try:
        heads_state = load_file(str(ckpt / "heads.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise MultitokenError(
            f"{ckpt}/heads.safetensors is corrupt or truncated ({exc})", flag
        ) from None
    model = MTPModel(trunk, HeadConfig(**meta["heads"]))
    try:
        model.heads.load_state_dict(heads_state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MultitokenError(
            f"{ckpt}/heads.safetensors does not match its config: {first}", flag
        ) from None
    return model, tokenizer, meta


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer state, trainer state) for --resume."""
    try:
        optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, RuntimeError, json.JSONDecodeError, EOFError) as exc:
        raise MultitokenError(
            f"{ckpt} has no usable optimizer/trainer state ({exc})", "--resume"
        ) from None
    return optim_state, state
