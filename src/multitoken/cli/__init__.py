"""``multitoken`` command line: one module per subcommand, each with ``add_parser(subparsers)``
and ``run(args) -> int``, found through :data:`COMMANDS`. Flags are generated from the config
dataclasses (:mod:`multitoken.cli.flags`), so the CLI and the Python API share one copy of every
default; a ``--config`` file (JSON or TOML, keys = flag names) sits between the defaults and the
flags given on the command line.

Bad input prints one line, ``multitoken: error: --flag: what is wrong``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from multitoken.cli import bench, distill, export, generate, serve, tokenizer, train
from multitoken.cli.flags import EXIT_USAGE, Parser, add_dataclass_flags
from multitoken.cli.stderr import error_line, log_warnings_to_stderr
from multitoken.errors import MultitokenError

__all__ = ["COMMANDS", "EXIT_USAGE", "add_dataclass_flags", "build_parser", "error_line", "main"]

# Subcommand name -> its module; the order is the order ``multitoken --help`` lists them in.
COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "generate": generate,
    "serve": serve,
    "distill": distill,
    "bench": bench,
    "export": export,
    "tokenizer": tokenizer,
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each subcommand's module adds its own parser."""
    parser = Parser(
        prog="multitoken",
        description="Multi-token prediction: train MTP heads (bpd, meta, deepseek) on a causal LM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are one line on stderr and an exit status, never a traceback."""
    args = build_parser().parse_args(argv)
    log_warnings_to_stderr()
    try:
        return COMMANDS[args.command].run(args)
    except MultitokenError as exc:
        print(f"multitoken: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("multitoken: interrupted", file=sys.stderr)
        return 130
