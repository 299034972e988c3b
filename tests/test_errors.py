"""The one user-facing exception (multitoken.errors): it reads as its message from Python, is a
ValueError, carries the flag at fault separately, and ``first_line`` quotes any exception in one
line."""

from __future__ import annotations

import pytest

from multitoken.errors import MultitokenError, first_line


def test_the_message_is_the_text_and_the_flag_is_kept_apart():
    error = MultitokenError("depth must be >= 1", "--depth")
    assert str(error) == error.message == "depth must be >= 1"
    assert error.flag == "--depth" and "--depth" not in str(error)
    assert MultitokenError("no flag").flag is None


def test_it_propagates_as_a_value_error_and_can_be_restated_with_another_flag():
    with pytest.raises(ValueError):
        raise MultitokenError("bad", "--trunk")
    restated = MultitokenError(MultitokenError("bad", "--trunk").message, "--checkpoint")
    assert (restated.message, restated.flag) == ("bad", "--checkpoint")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (RuntimeError("first\nsecond\nthird"), "first"),
        (OSError("  padded  \n"), "padded"),
        (KeyError(), "KeyError"),  # no text: its type's name
        (ValueError("\n\n"), "ValueError"),
    ],
)
def test_first_line_quotes_an_exception_in_one_line(error: BaseException, line: str):
    assert first_line(error) == line
