"""Options of ``multitoken serve`` (:class:`ServeConfig`): where the server listens, how many
requests it decodes together and queues, who may call it, how long it drains on SIGTERM.

How each request is decoded (``--tree``, ``--draft-len``, ``--no-speculate``) is
:class:`multitoken.config.GenerateConfig`'s, shared with ``multitoken generate``; a request's
own sampling settings and ``max_tokens`` override that config's for the request alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.config.fields import _field, _whole
from multitoken.errors import MultitokenError

API_KEY_VARIABLE = "MULTITOKEN_API_KEY"  # --api-key from the environment


@dataclass
class ServeConfig:
    """Options of ``multitoken serve``."""

    host: str = _field("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _field(8000, "port to listen on (0: a free one, printed at start)")
    max_batch: int = _field(16, "most requests decoded together in one batch")
    max_queue: int = _field(256, "most requests waiting for a row; past it a request gets 429")
    max_prefill: int = _field(
        512,
        "most prompt tokens prefilled before a decoding step; while rows are decoding, about "
        "as many as the last step verified, so that newcomers' prompts (a long one in chunks) "
        "hold the decoding rows up for about one step at most",
    )
    api_key: str | None = _field(
        None,
        f"every route but /health answers 401 without 'Authorization: Bearer KEY' (default: "
        f"${API_KEY_VARIABLE}, else none)",
    )
    model_name: str | None = _field(
        None, "the model id /v1/models lists and requests name (default: the checkpoint's name)"
    )
    grace: float = _field(
        30.0,
        "seconds SIGTERM lets requests in flight finish before cancelling them and exiting",
    )
    default_max_tokens: int = _field(
        256, "new tokens for a request that names no max_tokens (the context window caps it)"
    )

    def validate(self) -> None:
        if not _whole(self.port) or not 0 <= self.port <= 65535:
            raise MultitokenError(f"must be in 0..65535, got {self.port!r}", "--port")
        for name in ("max_batch", "max_queue", "max_prefill", "default_max_tokens"):
            value = getattr(self, name)
            if not _whole(value) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise MultitokenError(f"must be >= 1, got {value!r}", flag)
        if not self.grace >= 0:
            raise MultitokenError(f"must be >= 0, got {self.grace}", "--grace")
        if self.api_key is not None and not self.api_key.strip():
            raise MultitokenError("the API key is empty", "--api-key")
