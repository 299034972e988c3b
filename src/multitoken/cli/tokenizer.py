"""``multitoken tokenizer train``: fit a byte-level BPE tokenizer on a corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitoken.cli.flags import Parser
from multitoken.errors import MultitokenError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``tokenizer`` (with its one subcommand, ``train``) to the CLI's subcommands."""
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tools = parser.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    fit = tools.add_parser("train", help="fit a byte-level BPE tokenizer on a corpus")
    fit.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="text files, folders, globs or .jsonl (default: Python stdlib source)",
    )
    fit.add_argument("--vocab-size", type=int, default=8192, help="(default: 8192)")
    fit.add_argument("--out", required=True, help="tokenizer.json to write")
    return parser


def run(args: argparse.Namespace) -> int:
    """Fit on the corpus's train and validation files alike: a tokenizer has no held-out set."""
    from multitoken.text.tokenizer import train_bpe
    from multitoken.training.data import Corpus, iter_texts

    corpus = Corpus.from_specs(args.data or None)
    out = Path(args.out)
    if out.is_dir():
        raise MultitokenError(
            f"{out} is a folder; give a file name such as tokenizer.json", "--out"
        )
    files = sorted(set(corpus.train_files) | set(corpus.val_files))  # one file may serve both
    tok = train_bpe(iter_texts(files), args.vocab_size, out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")
    return 0
