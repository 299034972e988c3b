"""multitoken: multi-token prediction for causal language models.

Train BPD (Stern 2018 / Medusa), Meta (Gloeckle 2024) or DeepSeek-V3 MTP heads on a `transformers`
trunk, and load the result::

    import multitoken
    result = multitoken.train(preset="tiny", family="deepseek", depth=2, max_steps=300,
                              out="runs/x")
    model = multitoken.load("runs/x")        # an MTPModel; model.trunk is a plain HF model
    model = multitoken.load("path/to/hf-model", heads="path/to/heads")   # portable heads
    multitoken.export("runs/x", "out/trunk", "trunk-only")             # plain transformers folder
"""

from __future__ import annotations

from pathlib import Path

from multitoken.config import PRESETS, HeadConfig, TrainConfig
from multitoken.errors import MultitokenError
from multitoken.moved import install as _install_old_paths

_install_old_paths()

__all__ = ["PRESETS", "HeadConfig", "MultitokenError", "TrainConfig", "export", "load", "train"]
__version__ = "0.1.0"


def train(**options):
    """Train; keyword arguments are the CLI flags with ``-`` → ``_`` (see ``TrainConfig``)."""
    from multitoken.training.trainer import train as _train

    return _train(**options)


def load(path: str | Path, *, heads: str | Path | None = None, flag: str = "path"):
    """Load a model as an ``MTPModel`` ready to decode.

    ``path``: a checkpoint folder, a run folder (its ``latest``), or a plain local transformers
    model folder with its tokenizer (a DeepSeek-V3-layout folder brings its MTP modules as
    deepseek heads). ``heads``: a heads folder (or checkpoint) to attach to that trunk; heads made
    for another trunk are refused. The model's ``trunk`` is a plain ``transformers`` causal LM and
    ``tokenizer`` its tokenizer; ``model.generate(text, ...)`` decodes. ``flag`` names the
    argument in error messages.
    """
    from multitoken.io.checkpoint import load_checkpoint

    model, tokenizer, _meta = load_checkpoint(path, flag=flag, trunk_only_ok=True, heads=heads)
    model.tokenizer = tokenizer
    return model.eval()


def export(path: str | Path, out: str | Path, fmt: str, *, heads: str | Path | None = None):
    """Export the model at ``path`` (as :func:`load` reads it) to the new folder ``out``:
    ``fmt`` is ``"trunk-only"`` (a plain transformers folder), ``"heads"`` (the portable heads
    alone) or ``"deepseek-v3"`` (the DeepSeek-V3 checkpoint layout). Returns ``out``."""
    from multitoken.io.export import check_out
    from multitoken.io.export import export as _export

    check_out(Path(out))  # before minutes of loading a large model
    model = load(path, heads=heads, flag="--checkpoint")
    return _export(model, model.tokenizer, out, fmt)
