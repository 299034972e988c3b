"""``multitoken export``: the trunk alone, the heads alone, or the DeepSeek-V3 layout."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "export",
        help="write the trunk alone, the heads alone, or the DeepSeek-V3 layout",
        description="Export a checkpoint to a new folder. --trunk-only: a plain transformers "
        "model folder with its tokenizer (loads without multitoken); --heads-only: the portable "
        "heads (heads.safetensors + heads.json) to ship beside the trunk; --deepseek-v3: trunk + "
        "deepseek MTP modules as model.layers.{L+k}.* with num_nextn_predict_layers.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run folder (or a model folder or .gguf file)",
    )
    parser.add_argument("--heads", metavar="DIR", help="heads folder to attach first")
    parser.add_argument("--out", required=True, help="new folder to write")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--trunk-only", dest="format", action="store_const", const="trunk-only")
    what.add_argument("--heads-only", dest="format", action="store_const", const="heads")
    what.add_argument("--deepseek-v3", dest="format", action="store_const", const="deepseek-v3")
    return parser


def run(args: argparse.Namespace) -> int:
    """The Python API's :func:`multitoken.export`, which checks ``--out`` before loading."""
    import multitoken

    out = multitoken.export(args.checkpoint, args.out, args.format, heads=args.heads)
    print(f"wrote {out}")
    return 0
