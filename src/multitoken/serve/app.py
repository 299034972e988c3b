"""The HTTP side of ``multitoken serve``: OpenAI's routes over an :class:`~multitoken.serve.engine.
Engine`, on FastAPI.

Each completion request is checked (body, model name, prompt against the context window, the
engine's own :meth:`~multitoken.serve.engine.Engine.check`) before it is queued, so every bad
request is a 4xx with OpenAI's error body and a stream, once started, only ends well. The engine
calls back from its own thread; :class:`_Events` carries those calls into the request's event
loop. A request whose client has gone is cancelled in the engine, which frees its row.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from multitoken.config.serving import ServeConfig
from multitoken.serve.detokenize import Detokenizer
from multitoken.serve.http_errors import GuardedRoute, install_error_handlers
from multitoken.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from multitoken.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    parse_body,
)
from multitoken.serve.requests import Event
from multitoken.serve.requests import Request as Decode
from multitoken.text.chat import ChatTemplateError

if TYPE_CHECKING:
    from multitoken.model import MTPModel
    from multitoken.serve.engine import Engine

DISCONNECT_POLL_S = 0.25  # how often a request that does not stream checks for its client
DEFAULT_TEMPERATURE = 1.0  # OpenAI's, for a request that names none
OWNER = "multitoken"


class _Events:
    """One request's events, from the engine's thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is gone, nobody is waiting
            pass

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None if ``timeout`` seconds pass first."""
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


class _Service:
    """What the routes share: the engine, the model's tokenizer and limits, the metrics."""

    def __init__(self, engine: Engine, model: MTPModel, serving: ServeConfig) -> None:
        self.engine, self.serving = engine, serving
        self.tokenizer = model.tokenizer
        self.name = serving.model_name or OWNER
        self.stop_ids = frozenset(model.stop_ids())
        config = model.trunk.config
        self.context: int | None = getattr(config, "max_position_embeddings", None)
        self.created = int(time.time())
        self.metrics = Metrics(engine.stats)

    # -- checks ----------------------------------------------------------------------------
    async def authorize(self, request: Request) -> None:
        """401 unless the request carries ``Authorization: Bearer KEY`` (when a key is set)."""
        key = self.serving.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(
                401,
                "Incorrect API key provided: pass 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist (this server serves `{self.name}`)",
                param="model",
                code="model_not_found",
            )

    def max_tokens(self, asked: int | None, prompt_tokens: int, param: str) -> int:
        """``asked``, or the default capped to what the context window leaves after the prompt
        (an explicit value that does not fit is the engine's :meth:`check` to refuse)."""
        if asked is not None:
            return asked
        default = self.serving.default_max_tokens
        if self.context is None:
            return default
        room = self.context - prompt_tokens
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens: the model's context window of "
                f"{self.context} tokens leaves no room for an answer",
                param=param,
                code="context_length_exceeded",
            )
        return min(default, room)

    # -- one completion --------------------------------------------------------------------
    async def complete(self, request: Request, body, prompt: list[int], chat: bool) -> Response:
        """Queue one completion and answer it, streamed or whole."""
        started = time.perf_counter()
        param = "messages" if chat else "prompt"
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=param)
        decode = Decode(
            prompt=prompt,
            max_tokens=self.max_tokens(body.requested_max_tokens(), len(prompt), param),
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0),
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_ids=self.stop_ids,
        )
        self.engine.check(decode)  # RequestError: a 400 before anything is sent
        events = _Events()
        rid = self.engine.submit(decode, events)  # QueueFull: 429
        answer = _Answer(self, rid, events, Reply(self.name, chat), body, len(prompt), started)
        if body.stream:
            return _EventStream(answer)
        return await answer.whole(request)


class _EventStream(StreamingResponse):
    """An answer's server-sent events. However the response ends — the last event sent, the
    client gone before the first, the server cancelling it — the request is closed in the
    engine (a generator never started would run no ``finally``)."""

    def __init__(self, answer: _Answer) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(answer.stream(), media_type="text/event-stream", headers=headers)
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer.close()


class _Answer:
    """One queued request's events turned into text: whole, or as server-sent events."""

    def __init__(self, service: _Service, rid, events, reply: Reply, body, prompt_tokens, started):
        self.service, self.rid, self.events, self.reply = service, rid, events, reply
        self.text = Detokenizer(service.tokenizer, body.stop_strings(), service.stop_ids)
        self.include_usage = body.include_usage
        self.prompt_tokens, self.started = prompt_tokens, started
        self.endpoint = "chat" if reply.chat else "completions"
        self.first_token_seen = False
        self.done = False  # the engine is finished with the request (or was told to cancel it)
        self.closed = False

    def _take(self, event: Event) -> tuple[str, str | None]:
        """New text and, once the request is over, OpenAI's finish reason ("stop", "length";
        "cancelled" or "error" when the engine could not finish it)."""
        if event.tokens and not self.first_token_seen:
            self.first_token_seen = True
            elapsed = time.perf_counter() - self.started
            self.service.metrics.ttft.labels(self.endpoint).observe(elapsed)
        final = event.finish is not None
        text = self.text.add(event.tokens, final=final)
        if self.text.stopped:  # a stop string: the engine need not go on
            self.service.engine.cancel(self.rid)
            return text, "stop"
        return text, event.finish

    def close(self) -> None:
        """Once the answer is over: a request the engine has not finished (its client left,
        or the server is stopping) is cancelled, which frees its row. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.service.engine.cancel(self.rid)
            self.done = True
        latency = time.perf_counter() - self.started
        self.service.metrics.latency.labels(self.endpoint).observe(latency)

    async def whole(self, request: Request) -> Response:
        """The answer once the request is over; a client that hangs up before is noticed
        within :data:`DISCONNECT_POLL_S` and its request cancelled."""
        pieces: list[str] = []
        try:
            while True:
                event = await self.events.get(DISCONNECT_POLL_S)
                if event is None:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it
                    continue
                text, finish = self._take(event)
                pieces.append(text)
                if finish is not None:
                    self.done = True
                    break
        finally:
            self.close()
        if finish in ("cancelled", "error"):
            raise _failure(finish, event.error)
        reply = self.reply.response("".join(pieces), finish, self.prompt_tokens, self.text.tokens)
        return JSONResponse(reply)

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's format, ending ``data: [DONE]``. Starlette cancels
        this generator when the client disconnects; the ``finally`` then frees the row."""
        usage = self.include_usage
        try:
            if self.reply.chat:
                yield _sse(self.reply.chunk("", first=True, with_usage=usage))
            while True:
                event = await self.events.get()
                text, finish = self._take(event)
                if finish is not None:
                    self.done = True
                if text:
                    yield _sse(self.reply.chunk(text, with_usage=usage))
                if finish is not None:
                    break
            if finish in ("cancelled", "error"):
                failure = _failure(finish, event.error)
                yield _sse(failure.body())
            else:
                yield _sse(self.reply.chunk("", finish=finish, with_usage=usage))
                if usage:
                    yield _sse(self.reply.usage_chunk(self.prompt_tokens, self.text.tokens))
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def _failure(finish: str, error: str | None) -> ApiError:
    if finish == "cancelled":
        return ApiError(503, "the server is shutting down", type="server_error", code="cancelled")
    return ApiError(500, f"decoding failed: {error or 'unknown error'}", type="server_error")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _encode_prompt(service: _Service, body: CompletionRequest) -> list[int]:
    """``/v1/completions``' prompt as ids: a text encoded whole, as ``MTPModel.generate`` does
    (the tokenizer's BOS included), or ids as given (the engine checks them)."""
    prompt = body.prompt_value()
    if isinstance(prompt, str):
        return service.tokenizer.encode(prompt, add_special_tokens=True)
    return list(prompt)


def build_app(engine: Engine, model: MTPModel, serving: ServeConfig) -> FastAPI:
    """The OpenAI-compatible app over a started ``engine`` decoding ``model`` (an MTPModel with
    its tokenizer). The engine is the caller's to start and shut down."""
    service = _Service(engine, model, serving)
    app = FastAPI(title="multitoken", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = GuardedRoute
    app.state.service = service
    install_error_handlers(app, lambda status: service.metrics.refused.labels(str(status)).inc())
    guarded = [Depends(service.authorize)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {
            "id": service.name,
            "object": "model",
            "created": service.created,
            "owned_by": OWNER,
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def one_model(name: str) -> dict:
        service.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await request.body())
        service.check_model(body.model)
        messages = [m.as_template_input() for m in body.messages]
        try:
            text = service.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise ApiError(400, exc.message, param="messages") from None
        prompt = service.tokenizer.encode(text, add_special_tokens=False)
        return await service.complete(request, body, prompt, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionRequest, await request.body())
        service.check_model(body.model)
        return await service.complete(request, body, _encode_prompt(service, body), chat=False)

    return app
