"""What every subcommand's parser shares: flags generated from the config dataclasses (so the CLI
and the Python API keep one copy of every default), the one-line usage error, and reading the
decoding options back out of parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit 2, like every other error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _base_type(annotation) -> type:
    """``int | None`` -> int, ``list[str]`` -> list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    exclude: typing.Collection[str] = (),
) -> None:
    """One flag per field; the default shown is the dataclass's (the parser's is SUPPRESS, so
    only flags the user typed override the config file). ``exclude``: fields that are not the
    command's to set (``serve`` takes the sampling options per request, not as flags)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "heads" or f.name in exclude:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = meta.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(nargs="+", action="extend", metavar="PATH")
        else:
            kwargs["type"] = meta.get("parse", kind)  # e.g. --draft-len: auto or a number
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        group.add_argument(flag, **kwargs)


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, typing.Any]:
    """The fields of ``cls`` the user typed as flags; the rest keep the dataclass's default."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
