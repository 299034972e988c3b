"""A request's text as its tokens arrive: incremental detokenization with stop strings.

Text is released to the client as soon as it cannot change, which is later than its tokens
arrive in two cases. A byte-level token can end inside a UTF-8 character: the decoded tail is
then U+FFFD until the next token completes it, so a trailing U+FFFD is held back (as
``multitoken generate`` does). And text that could be the start of a stop string is held back
until it is known not to be one, so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from multitoken.text.tokenizer import Tokenizer


class Detokenizer:
    """Accumulates one request's tokens; :meth:`add` returns the new text safe to send and
    whether a stop string ended the request (the text is then cut before it)."""

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), stop_ids: Collection[int] = ()
    ) -> None:
        self.tokenizer, self.stop, self.stop_ids = tokenizer, list(stop), frozenset(stop_ids)
        self.ids: list[int] = []
        self.tokens = 0  # every token received, a stop token included (usage counts it)
        self.sent = 0  # characters of the decoded text released so far
        self.stopped = False  # a stop string was found

    def add(self, tokens: Sequence[int], final: bool = False) -> str:
        """New text after ``tokens``. ``final``: no token follows, so nothing is held back; a
        stop token the request ended with (the engine puts it last) is not text."""
        if self.stopped:
            return ""
        self.tokens += len(tokens)
        tokens = list(tokens)
        if final and tokens and tokens[-1] in self.stop_ids:
            tokens.pop()
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        cut = self._first_stop(text, end)
        if cut is not None:
            self.stopped = True
            end = cut
        elif not final:
            end -= self._partial_stop(text, end)
        if end <= self.sent:
            return ""
        new, self.sent = text[self.sent : end], end
        return new

    def _first_stop(self, text: str, end: int) -> int | None:
        """Where the earliest stop string in ``text[:end]`` starts (None: none does). Only text
        not yet sent, plus a stop string's length before it, can hold a new one."""
        found = None
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop) + 1), end)
            if at >= 0 and (found is None or at < found):
                found = at
        return found

    def _partial_stop(self, text: str, end: int) -> int:
        """How many characters before ``end`` could begin a stop string that the next tokens
        complete: those wait."""
        held = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.sent), held, -1):
                if text.endswith(stop[:n], 0, end):
                    held = n
                    break
        return held
