"""multitoken: multi-token prediction for causal language models.

Train BPD (Stern 2018 / Medusa), Meta (Gloeckle 2024) or DeepSeek-V3 MTP heads on a `transformers`
trunk, and load the result::

    import multitoken
    result = multitoken.train(preset="tiny", family="deepseek", depth=2, max_steps=300,
                              out="runs/x")
    model = multitoken.load("runs/x")        # an MTPModel; model.trunk is a plain HF model
"""

from __future__ import annotations

from pathlib import Path

from multitoken.config import PRESETS, HeadConfig, TrainConfig
from multitoken.errors import MultitokenError

__all__ = ["PRESETS", "HeadConfig", "MultitokenError", "TrainConfig", "load", "train"]
__version__ = "0.1.0"


def train(**options):
    """Train; keyword arguments are the CLI flags with ``-`` → ``_`` (see ``TrainConfig``)."""
    from multitoken.trainer import train as _train

    return _train(**options)


def load(path: str | Path, *, flag: str = "path"):
    """Load a checkpoint folder (or a run folder, following its ``latest``) as an ``MTPModel``.

    The model's ``trunk`` is a plain ``transformers`` causal LM and ``tokenizer`` its tokenizer;
    ``model.generate(text, ...)`` decodes. ``flag`` names the argument in error messages.
    """
    from multitoken.checkpoint import load_checkpoint

    model, tokenizer, _meta = load_checkpoint(path, flag=flag, trunk_only_ok=True)
    model.tokenizer = tokenizer
    return model.eval()
