"""What a request to the serving engine is, what it gets back, and why one is refused.

:class:`Request` (token ids and the request's own sampling settings), the :class:`Event` stream
its callback receives, the engine's counters (:class:`EngineStats`), and the refusals an HTTP
server maps to status codes: :class:`RequestError` (400), :class:`QueueFull` (429),
:class:`Unavailable` (503).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from multitoken.errors import MultitokenError


class QueueFull(MultitokenError):
    """The queue holds ``max_queue`` requests already (HTTP 429)."""


class Unavailable(MultitokenError):
    """The engine is shutting down and takes no new request (HTTP 503)."""


class RequestError(MultitokenError):
    """A request the model cannot decode: empty prompt, prompt + max_tokens past the context
    window, bad sampling values (HTTP 400)."""


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # token ids, special tokens included
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: fresh randomness
    stop_ids: frozenset[int] = frozenset()  # tokens that end the request (kept as its last)


@dataclass
class Event:
    """What a request gets, on the engine's thread: new tokens, and with the last event why
    it finished: "stop" (a stop token, the last of ``tokens``), "length" (max_tokens),
    "cancelled" (:meth:`Engine.cancel`, or shut down), "error" (``error`` says what)."""

    tokens: list[int]
    finish: str | None = None
    error: str | None = None


@dataclass
class EngineStats:
    requests: int = 0  # submitted
    finished: int = 0
    tokens_in: int = 0  # prompt tokens prefilled
    tokens_out: int = 0  # tokens emitted
    steps: int = 0  # decoding steps (one trunk pass each)
    draft_steps: int = 0  # of them, steps that verified drafts
    row_passes: int = 0  # rows summed over steps
    drafts_accepted: int = 0  # accepted drafts summed over rows and steps
    queue_length: int = 0
    batch_size: int = 0
    tokens_per_s: float = 0.0  # emitted over the last RATE_WINDOW_S seconds
    tau: float = 0.0  # tokens per row per step, over the whole run
    histogram: dict = field(default_factory=dict)  # accepted drafts per row-step -> count
