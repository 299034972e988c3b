"""``multitoken train``: train a trunk with MTP heads, from flags and an optional config file."""

from __future__ import annotations

import argparse
import sys

from multitoken.cli.flags import add_dataclass_flags
from multitoken.config import HeadConfig, TrainConfig, read_config_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "train",
        help="train a trunk with MTP heads",
        description="Train a causal LM with multi-token-prediction heads. Example: multitoken "
        "train --preset tiny --family deepseek --depth 2 --max-steps 300 --out runs/x",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or TOML file of options (keys are flag names); flags win",
    )
    add_dataclass_flags(parser, HeadConfig, "heads")
    add_dataclass_flags(parser, TrainConfig, "training")
    return parser


def run(args: argparse.Namespace) -> int:
    """Config file first, then the flags typed; a diverged run exits 1 naming the checkpoint kept."""
    from multitoken.training.trainer import NonFiniteLoss, acceptance_line
    from multitoken.training.trainer import run as train

    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    try:
        result = train(TrainConfig.from_dict(values))
    except NonFiniteLoss as exc:
        print(f"multitoken: {exc}", file=sys.stderr)
        return 1
    val = result.val or {}
    if "tau" in val:  # acceptance is what the heads are for: the run's last held-out figures
        heads = "/".join(f"{a:.0%}" for a in val["head_acc"])
        print(f"held out: {acceptance_line(val)}; top-1 per head {heads}")
    print(f"checkpoint: {result.checkpoint}")
    return 0
