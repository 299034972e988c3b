"""What the server's tests share: a tiny checkpoint with a chat template, the server running in
the test process on a free port, and a fake engine for the tests that must decide what a
request emits and when (stop strings, a full queue, a client leaving mid-stream).

This folder is a package (``__init__.py``) so that this conftest is ``serve.conftest``: test
modules elsewhere import the top-level ``conftest`` by name, which a second plain
``conftest`` module would shadow."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import costs, perturb_heads
from helpers import build_model, write_tokenizer

import multitoken
from multitoken.config import GenerateConfig, HeadConfig, ServeConfig
from multitoken.io.checkpoint import save_checkpoint
from multitoken.model import MTPModel
from multitoken.serve.app import build_app
from multitoken.serve.engine import Engine
from multitoken.serve.requests import EngineStats, Event, QueueFull, Request, RequestError
from multitoken.text.tokenizer import load_tokenizer

MODEL = "tiny"  # the model name the test servers serve
KEY = "sesame"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder: a random Llama (context 256) over a small byte-level BPE whose chat
    template ends each turn with ``</s>``, the eos, and BPD heads (D = 2) off their initial
    values."""
    root = tmp_path_factory.mktemp("serve")
    write_tokenizer(root / "tokenizer", "template-bos")
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    trunk = build_model("llama", tokenizer.vocab_size)
    model = perturb_heads(MTPModel(trunk, HeadConfig(family="bpd", depth=2)))
    save_checkpoint(root / "run", 1, model, tokenizer, {})
    return root / "run"


@pytest.fixture(scope="session")
def served_model(tiny_run: Path) -> MTPModel:
    """The model the in-process servers decode with (tests must not decode with it themselves
    while a server runs: see ``reference_model``)."""
    return multitoken.load(tiny_run)


@pytest.fixture(scope="session")
def reference_model(tiny_run: Path) -> MTPModel:
    """A second copy of the model, for the outputs the server's are compared with."""
    return multitoken.load(tiny_run)


# ---------------------------------------------------------------------------------------------
# The server in this process
# ---------------------------------------------------------------------------------------------


class Running:
    """An app served by uvicorn on a free port of 127.0.0.1, from a thread of the test."""

    def __init__(self, app, engine) -> None:
        self.engine = engine
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="error", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, (
                "the server did not start"
            )
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "x", **options) -> openai.OpenAI:
        """The official client, pointed at this server."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def http(self, **options) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)

    def wait_idle(self, timeout: float = 20.0) -> EngineStats:
        """The engine's stats once no request is queued or decoding (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats.batch_size == 0 and stats.queue_length == 0:
                return stats
            assert time.monotonic() < deadline, f"the engine did not drain: {stats}"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.engine.shutdown(0.0)


@pytest.fixture
def serve(served_model) -> Iterator[Callable[..., Running]]:
    """``serve(engine, **serving)``: ``engine`` started and served (ServeConfig fields in
    ``serving``) until the test ends."""
    running: list[Running] = []

    def start(engine, **serving) -> Running:
        engine.start()
        app = build_app(engine, served_model, ServeConfig(model_name=MODEL, **serving))
        running.append(Running(app, engine))
        return running[-1]

    yield start
    for server in running:
        server.close()


@pytest.fixture(scope="module")
def real_server(tiny_run) -> Iterator[Running]:
    """The real engine on its own copy of the model, served for a whole test module: the default
    decoding (trees sized by the costs, prompt lookup) under a fixed cost model where drafts
    are cheap, so the trees grow without minutes spent timing the trunk."""
    model = multitoken.load(tiny_run)
    serving = ServeConfig(model_name=MODEL, max_batch=4)
    cheap = costs([1.0 + 0.05 * q for q in range(33)])
    engine = Engine(model, decoding=GenerateConfig(), serving=serving, costs=cheap)
    engine.start()
    server = Running(build_app(engine, model, serving), engine)
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------
# A fake engine
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _FakeRow:
    rid: int
    request: Request
    on_event: Callable[[Event], None]
    emitted: int = 0


class FakeEngine:
    """:class:`multitoken.serve.engine.Engine`'s interface with a fixed rule: a request's i-th
    token is ``script[i % len(script)]``, ``per_step`` tokens a step, one step every ``delay``
    seconds, through a stop token or ``max_tokens``. :meth:`pause` holds every row where it is
    (so the queue fills); ``requests`` is what was submitted."""

    def __init__(
        self,
        script: list[int],
        context: int = 256,
        max_batch: int = 4,
        max_queue: int = 8,
        per_step: int = 2,
        delay: float = 0.002,
    ) -> None:
        self.script, self.context, self.per_step, self.delay = script, context, per_step, delay
        self.max_batch, self.max_queue = max_batch, max_queue
        self.requests: list[Request] = []
        self.cancelled: set[int] = set()  # every id ever cancelled
        self._cond = threading.Condition()
        self._queue: collections.deque[_FakeRow] = collections.deque()
        self._rows: list[_FakeRow] = []
        self._ids = itertools.count(1)
        self._stats = EngineStats()
        self._go = threading.Event()
        self._go.set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def check(self, request: Request) -> None:
        if not request.prompt:
            raise RequestError("the prompt is empty", "prompt")
        if len(request.prompt) + request.max_tokens > self.context:
            raise RequestError(
                f"prompt + max_tokens is past the context of {self.context}", "--max-tokens"
            )

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        self.check(request)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull("the queue is full")
            rid = next(self._ids)
            self._queue.append(_FakeRow(rid, request, on_event))
            self.requests.append(request)
            self._stats.requests += 1
        return rid

    def cancel(self, rid: int) -> None:
        with self._cond:
            self.cancelled.add(rid)

    def shutdown(self, grace: float) -> None:
        self._stop = True
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def stats(self) -> EngineStats:
        with self._cond:
            stats = dataclasses.replace(self._stats, histogram=dict(self._stats.histogram))
            stats.queue_length, stats.batch_size = len(self._queue), len(self._rows)
        return stats

    def _run(self) -> None:
        while not self._stop:
            time.sleep(self.delay)
            self._go.wait()
            with self._cond:
                sends = self._drop_cancelled()
                while self._queue and len(self._rows) < self.max_batch:
                    row = self._queue.popleft()
                    self._stats.tokens_in += len(row.request.prompt)
                    self._rows.append(row)
                sends += [(row, self._advance(row)) for row in self._rows]
                self._rows = [row for row, event in sends if row in self._rows and not event.finish]
                if sends:
                    self._stats.steps += 1
            for row, event in sends:
                row.on_event(event)

    def _drop_cancelled(self) -> list[tuple[_FakeRow, Event]]:
        gone = [r for r in [*self._queue, *self._rows] if r.rid in self.cancelled]
        self._queue = collections.deque(r for r in self._queue if r not in gone)
        self._rows = [r for r in self._rows if r not in gone]
        self._stats.finished += len(gone)
        return [(row, Event([], "cancelled")) for row in gone]

    def _advance(self, row: _FakeRow) -> Event:
        request, tokens = row.request, []
        for _ in range(self.per_step):
            token = self.script[row.emitted % len(self.script)]
            tokens.append(token)
            row.emitted += 1
            if token in request.stop_ids or row.emitted >= request.max_tokens:
                finish = "stop" if token in request.stop_ids else "length"
                self._count(tokens, finished=True)
                return Event(tokens, finish)
        self._count(tokens, finished=False)
        return Event(tokens)

    def _count(self, tokens: list[int], finished: bool) -> None:
        s = self._stats
        s.tokens_out += len(tokens)
        s.row_passes += 1
        s.drafts_accepted += len(tokens) - 1
        s.histogram[len(tokens) - 1] = s.histogram.get(len(tokens) - 1, 0) + 1
        s.finished += finished
