"""How the server answers what goes wrong: every failure gets OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``) and a status that says whose fault it is —
bad input a 4xx, a full queue 429, a server shutting down 503, a bug 500 — and the server goes
on serving."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from multitoken.errors import MultitokenError
from multitoken.serve.protocol import ApiError, error_body
from multitoken.serve.requests import QueueFull, RequestError, Unavailable

log = logging.getLogger("multitoken")


class GuardedRoute(APIRoute):
    """A route whose unexpected exceptions become a 500 with OpenAI's body inside the route:
    left to Starlette's last-resort handler, the client would get the same body but the
    server would also drop its connection."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, MultitokenError, HTTPException, RequestValidationError):
                raise  # answered by their handlers
            except Exception as exc:
                log.exception("unexpected error answering %s %s", request.method, request.url.path)
                message = f"internal error: {type(exc).__name__}: {exc}"
                raise ApiError(500, message, type="server_error") from exc

        return guarded


def install_error_handlers(app: FastAPI, count: Callable[[int], None]) -> None:
    """Every failure answers with OpenAI's error body: bad input a 4xx, the queue full a 429,
    anything unexpected a 500 (the server goes on). ``count(status)`` is told of each."""

    def answer(status: int, body: dict) -> JSONResponse:
        count(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return answer(exc.status, exc.body())

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
        return answer(429, error_body(exc.message, "rate_limit_error", code="queue_full"))

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        return answer(503, error_body(exc.message, "server_error", code="unavailable"))

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return answer(400, error_body(exc.message, param=_param(exc.flag)))

    @app.exception_handler(MultitokenError)
    async def bad_input(_request: Request, exc: MultitokenError) -> JSONResponse:
        return answer(400, error_body(exc.message, param=_param(exc.flag)))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return answer(400, error_body(message))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{exc.detail} ({request.method} {request.url.path})"
        return answer(exc.status_code, error_body(message))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return answer(500, error_body(message, "server_error"))


def _param(flag: str | None) -> str | None:
    """An error's flag (``--max-tokens``) as the request field it names (``max_tokens``)."""
    return flag.lstrip("-").replace("-", "_") if flag else None
