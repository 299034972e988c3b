"""The OpenAI wire format: request bodies of ``/v1/chat/completions`` and ``/v1/completions``,
the responses and stream chunks they get, and the error body.

Clients written for OpenAI (its Python client, chat UIs, evaluation harnesses) send fields this
server has no use for (``tools``, ``metadata``, ``user`` ...) and fields of other servers'
APIs: fields it does not know are accepted whatever their type, so such clients work unchanged.
The fields it uses are typed strictly, as OpenAI types them (``"max_tokens": "5"`` is refused,
not coerced), and their ranges are checked here, so that a bad request is a 400 naming the field
before anything is queued. OpenAI's fields that would change the answer and that this server does
not implement (penalties, ``logit_bias``, log-probabilities, ``echo``, ``best_of``, ``suffix``,
a JSON ``response_format``) are typed as well and refused with a 400 naming the field when set
to anything but their neutral value, rather than silently ignored: a client that asked for them
would otherwise take an answer made without them for one made with them.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from multitoken.text.chat import content_text

MAX_STOP_STRINGS = 4  # OpenAI's limit on ``stop``
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch generator's manual_seed takes


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error body (:func:`error_body`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``: what OpenAI answers a refused
    request with, and what its client reads the message from."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: OpenAI refuses "5" for an integer; extra="allow": fields of other APIs pass
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        """The message as chat templates expect it: a role and the content as one string
        (text parts joined; templates of small models index strings, not part lists)."""
        parts = self.content
        if isinstance(parts, list):
            if any(p.type != "text" or p.text is None for p in parts):
                raise ApiError(400, "only text content parts are supported", param="messages")
            parts = [p.model_dump() for p in parts]
        message = {"role": self.role, "content": content_text(parts)}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(_Body):
    type: str


def _unsupported(name: str, value: Any, neutral: Any) -> None:
    """Refuse ``name`` set to a value other than ``neutral`` (None, the default, is neutral)."""
    if value is not None and value != neutral:
        raise ApiError(400, f"{name} is not supported by this server (got {value!r})", param=name)


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM, llama.cpp): 0 or -1 = off
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's, typed and checked, refused unless neutral (module docstring)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        """The ranges OpenAI accepts (400 naming the field otherwise)."""
        limit = self.requested_max_tokens()
        if limit is not None and limit < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {limit}", param="max_tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ApiError(
                400, f"temperature must be in [0, 2], got {self.temperature}", param="temperature"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise ApiError(400, f"top_k must be >= 0 (or -1: off), got {self.top_k}", param="top_k")
        if self.n is not None and self.n != 1:
            raise ApiError(400, f"only n = 1 is supported, got {self.n}", param="n")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ApiError(400, "seed must fit in 64 bits", param="seed")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop sequences", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "a stop sequence is empty", param="stop")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise ApiError(400, f"{name} must be in [-2, 2], got {value}", param=name)
            _unsupported(name, value, 0)
        _unsupported("logit_bias", self.logit_bias, {})
        self.check_unsupported()

    def check_unsupported(self) -> None:
        """The endpoint's own fields this server does not implement."""

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    def check_unsupported(self) -> None:
        _unsupported("logprobs", self.logprobs, False)
        _unsupported("top_logprobs", self.top_logprobs, 0)
        kind = None if self.response_format is None else self.response_format.type
        _unsupported("response_format", kind, "text")

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def check(self) -> None:
        if not self.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        super().check()


class CompletionRequest(_Sampling):
    # a text, a list of one text, token ids, or a list of one list of token ids
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        _unsupported("logprobs", self.logprobs, 0)
        _unsupported("echo", self.echo, False)
        _unsupported("best_of", self.best_of, 1)
        _unsupported("suffix", self.suffix, "")

    def check(self) -> None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list):
            if len(self.prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
        if self.prompt in ("", [], [""], [[]]):
            raise ApiError(400, "the prompt is empty", param="prompt")
        super().check()

    def prompt_value(self) -> str | list[int]:
        """The one prompt: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """A request body as ``model``: malformed JSON, a wrong type or a value out of range is an
    :class:`ApiError` (400) naming the field, never an exception the server answers 500 to."""
    try:
        body = model.model_validate_json(raw or b"")
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        param = _param(first["loc"])
        where = f"{param}: " if param else ""
        raise ApiError(400, f"{where}{first['msg']}", param=param) from None
    body.check()
    return body


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "content")`` -> ``messages[0].content``; pydantic's union branch tags
    (``list[int]``) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """One answer's fixed parts (id, model, creation time, endpoint): builds its whole response
    or each stream chunk in OpenAI's shape for that endpoint."""

    def __init__(self, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = completion_id(chat), model, chat
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def response(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole answer of a request that did not stream."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        out = self._envelope([choice], chunk=False)
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out

    def chunk(
        self, text: str, finish: str | None = None, first: bool = False, with_usage: bool = False
    ) -> dict:
        """One streamed piece: new ``text`` (a chat's first chunk also names the role; its last
        has an empty delta and the finish reason). ``with_usage``: ``"usage": null``, as OpenAI
        marks every chunk before the usage chunk when the client asked for usage."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        out = self._envelope([choice], chunk=True)
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        out = self._envelope([], chunk=True)
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out
