"""The one exception type users see: a problem with their input, named with the flag at fault.

The CLI prints it as a single line and exits with status 2 (argparse's convention for usage
errors); the Python API lets it propagate like any other ``ValueError``.
"""

from __future__ import annotations


class MultitokenError(ValueError):
    """Bad input. ``flag`` names the CLI option (or API argument) the user should change."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)
