"""Loading a model for the commands that decode with it (generate, distill)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from multitoken.config import RuntimeConfig

if TYPE_CHECKING:  # torch and transformers load only once a command runs, not for --help
    from multitoken.hardware import Precision
    from multitoken.model import MTPModel


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--heads``: the model a decoding command loads."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run folder, or a plain transformers model folder or .gguf file "
        "(with --heads)",
    )
    parser.add_argument("--heads", metavar="DIR", help="heads folder to attach to that trunk")


def load_for_decoding(
    args: argparse.Namespace, heads: str | None = None
) -> tuple[MTPModel, Precision]:
    """``--checkpoint`` loaded and placed on ``--device`` in ``--precision``; the choice is
    reported once the command's input has all been checked (bad input stays one line)."""
    import multitoken
    from multitoken.hardware import place_for_decoding

    runtime = RuntimeConfig.from_options(args)
    runtime.validate()  # before minutes of loading a large model
    model = multitoken.load(args.checkpoint, heads=heads, flag="--checkpoint")
    precision = place_for_decoding(model, runtime.device, runtime.precision)
    return model, precision
