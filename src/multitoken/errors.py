"""The one exception type users see: a problem with their input, and the option at fault.

The message speaks of the input, not of a command line, so ``str(exc)`` reads the same from
Python; the option is the ``flag`` field. The CLI prints ``flag: message`` as a single line and
exits with status 2 (argparse's convention for usage errors); the Python API lets it propagate
like any other ``ValueError``.
"""

from __future__ import annotations


class MultitokenError(ValueError):
    """Bad input. ``message`` says what is wrong; ``flag`` names the CLI option (or API argument)
    the user should change, or is None. A caller that knows better which option is at fault
    restates it: ``MultitokenError(exc.message, "--other")``."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        self.message = message
        self.flag = flag
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none: what a
    one-line error can quote of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
