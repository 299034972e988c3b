"""``multitoken serve``: an OpenAI-compatible HTTP server over a checkpoint, decoding every
request in flight as one batch (continuous batching, self-speculative).

fastapi and uvicorn are imported only once the command runs, so ``multitoken --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from multitoken.cli.decoding import add_model_flags, load_for_decoding
from multitoken.cli.flags import add_dataclass_flags, given_fields
from multitoken.config import API_KEY_VARIABLE, GenerateConfig, RuntimeConfig, ServeConfig
from multitoken.errors import MultitokenError

# GenerateConfig's fields a request sets for itself (OpenAI's max_tokens, temperature, ...) are
# not flags of the server; nor is --typical: a server's output follows the trunk exactly.
NOT_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "typical")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over OpenAI's HTTP API (continuous batching)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and "
        "/metrics. Each request brings its own max_tokens, temperature, top_p, top_k, stop and "
        "seed; how every request is decoded (--tree, --draft-len, --no-speculate) is the "
        "server's.",
    )
    add_model_flags(parser)
    add_dataclass_flags(parser, ServeConfig, "serving")
    add_dataclass_flags(parser, GenerateConfig, "decoding", exclude=NOT_FLAGS)
    add_dataclass_flags(parser, RuntimeConfig, "hardware")
    return parser


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The flags as a validated :class:`ServeConfig`: the key from the environment when no
    ``--api-key`` is given, the model named after the checkpoint when no ``--model-name``."""
    options = given_fields(ServeConfig, args)
    if options.get("api_key") is None:
        options["api_key"] = os.environ.get(API_KEY_VARIABLE) or None
    if options.get("model_name") is None:
        path = Path(args.checkpoint)
        options["model_name"] = (path.stem if path.suffix == ".gguf" else path.name) or "model"
    serving = ServeConfig(**options)
    serving.validate()
    return serving


def run(args: argparse.Namespace) -> int:
    """Load, start the engine, serve until SIGTERM or SIGINT, drain, exit 0."""
    serving = serve_config(args)
    decoding = GenerateConfig(**given_fields(GenerateConfig, args))
    decoding.validate()  # before loading the model
    model, _precision = load_for_decoding(args, heads=args.heads)

    import uvicorn

    from multitoken.serve.app import build_app
    from multitoken.serve.engine import Engine

    engine = Engine(model, decoding=decoding, serving=serving)
    engine.start()
    try:
        listener = _listen(serving.host, serving.port)
    except MultitokenError:
        engine.shutdown(0.0)
        raise
    config = uvicorn.Config(
        build_app(engine, model, serving),
        timeout_graceful_shutdown=serving.grace,
        log_level="warning",
    )
    server = _announcing_server(config, serving.model_name)
    # The server's own handler, from now on: a signal before uvicorn takes the signals over
    # still stops it, and the one uvicorn re-raises once it is done (into the handler it found)
    # lets the engine drain and the command exit 0, instead of killing the process.
    previous = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[listener])
    finally:
        left = serving.grace
        if server.stopping_since is not None:  # uvicorn already spent part of the grace period
            left = max(0.0, serving.grace - (time.monotonic() - server.stopping_since))
        engine.shutdown(left)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("multitoken: stopped", file=sys.stderr)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise MultitokenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", "--port"
        ) from None


def _announcing_server(config, model_name: str):
    """uvicorn's server, printing the address it really listens on (``--port 0``: a free one)
    once it accepts connections, and noting when a stop signal arrived."""
    import uvicorn

    class Server(uvicorn.Server):
        stopping_since: float | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(
                    f"multitoken: serving {model_name} on http://{shown}:{port}",
                    file=sys.stderr,
                    flush=True,
                )

        def handle_exit(self, sig, frame) -> None:
            if self.stopping_since is None:
                self.stopping_since = time.monotonic()
            super().handle_exit(sig, frame)

    return Server(config)
