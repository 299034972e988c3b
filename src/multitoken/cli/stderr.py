"""What the command line says on stderr: errors as one line naming the flag at fault, and the
library's logged warnings as one ``multitoken: warning:`` line each."""

from __future__ import annotations

import logging
import sys

from multitoken.errors import MultitokenError


def error_line(exc: MultitokenError) -> str:
    """``--flag: what is wrong``: the error as the command line says it. The message itself
    speaks of the input; only here is it tied to the option to change."""
    return f"{exc.flag}: {exc.message}" if exc.flag else exc.message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("multitoken: warning: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def log_warnings_to_stderr() -> None:
    """Warnings as one ``multitoken: warning:`` line each; installed once per process."""
    log = logging.getLogger("multitoken")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.WARNING)
    log.propagate = False
