"""The serving engine: every request in flight is a row of one ragged batch (continuous batching).

One thread runs the phases of :mod:`multitoken.decode.phases` — the same ``step`` as
:func:`multitoken.decode.api.generate` — over the batch, and between two steps:

    drop     rows whose request was cancelled (a client went away) leave
    admit    queued requests, up to ``max_batch`` rows, are prefilled apart and join the batch
             (:func:`multitoken.decode.batching.join`); while rows are decoding, about as
             many prompt tokens as the last step verified are prefilled before the next step
             (a longer prompt alone, in such chunks), so newcomers hold the decoding rows up
             for about one step at most; with no row decoding, up to ``max_prefill``
    step     propose → verify → accept → commit → observe, the draft source chosen for the
             batch's size by the same cost model as ``generate`` (speculation turns itself down
             where the batch makes verification dear: whole steps are timed per batch size)
    emit     each row's new tokens, cut at its own ``max_tokens`` and stop tokens, go to its
             request's callback; finished rows retire

Each row keeps its own sampling settings and random generator
(:class:`~multitoken.decode.sampling.RowSampling`,
:class:`~multitoken.decode.sampling.RowGenerators`), so a greedy request's output is
token-for-token ``generate``'s whatever else is in flight, and a sampled one follows the trunk's
distribution exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from multitoken.config import GenerateConfig, ServeConfig
from multitoken.decode.api import (
    DraftSource,
    check_prompts,
    draft_source,
    make_plan,
    observe_drafting,
    step,
)
from multitoken.decode.batching import extend_prefill, join
from multitoken.decode.costs import CostModel, Stopwatch, cost_model
from multitoken.decode.kernels import choose_linear_kernel, linear_kernels
from multitoken.decode.kvcache import unrollable_layers
from multitoken.decode.phases import Decodable, Decoding, Plan, prefill, read_host, retire
from multitoken.decode.sampling import RowGenerators, RowSampling, Sampling
from multitoken.decode.trees.budget import AUTO_MAX_DRAFTS
from multitoken.errors import MultitokenError, first_line
from multitoken.serve.requests import (
    EngineStats,
    Event,
    QueueFull,
    Request,
    RequestError,
    Unavailable,
)

log = logging.getLogger("multitoken")

__all__ = ["Engine", "EngineStats", "Event", "QueueFull", "Request", "RequestError", "Unavailable"]

RATE_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds
MIN_PREFILL_CHUNK = 32  # prompt tokens prefilled between two steps at least


@dataclass(eq=False)
class _Row:
    """A request and what the engine keeps for it while it decodes."""

    rid: int
    request: Request
    on_event: Callable[[Event], None]
    sampling: Sampling
    generator: torch.Generator
    emitted: int = 0


@dataclass(eq=False)
class _Chunked:
    """A prompt past the prefill budget being prefilled alone, a chunk between steps."""

    row: _Row
    state: Decoding | None = None
    done: int = 0  # prompt tokens through the trunk


class Engine:
    """One thread decodes every request in flight as one ragged batch. ``decoding``: how
    (``--tree``, ``--draft-len``, ``--no-speculate``; its sampling fields are each request's
    own); ``costs``: the cost model the automatic modes choose by (default: measured at
    :meth:`start`)."""

    def __init__(
        self,
        model: Decodable,
        decoding: GenerateConfig | None = None,
        serving: ServeConfig | None = None,
        costs: CostModel | None = None,
    ) -> None:
        self.model, self.costs = model, costs
        self.serving = serving or ServeConfig()
        self.serving.validate()
        recurrent = unrollable_layers(model.trunk.config)
        if recurrent:
            raise MultitokenError(
                f"this trunk keeps a recurrent state ({', '.join(recurrent)}): a batch of "
                "prompts of different lengths cannot be decoded on it",
                "--checkpoint",
            )
        greedy = dict(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, seed=None)
        self.base = make_plan(model, [[0]], decoding, **greedy)
        self.reserve = max(self.base.k_max, self.base.lookup) if self.base.speculate else 0
        self.device = model.parts.embed.weight.device
        self._cond = threading.Condition()
        self._queue: collections.deque[_Row] = collections.deque()
        self._cancelled: set[int] = set()
        self._chunked: _Chunked | None = None
        self._state: Decoding | None = None
        self._rows: list[_Row] = []  # row b of the batch is self._rows[b]
        self._plan: Plan | None = None
        self._last_step_tokens = 0  # tokens the last step verified, over all rows
        self._sources: dict[int, DraftSource] = {}  # by batch size
        self._ids = itertools.count(1)
        self._accepting, self._stopping = True, False
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # -- the caller's side (any thread) ---------------------------------------------------------

    def start(self) -> None:
        """Measure the cost model (automatic modes) and start the decoding thread."""
        base = self.base
        tree_auto = base.tree is not None and base.tree.auto
        if (base.auto or tree_auto) and base.speculate and self.costs is None:
            q_max = (AUTO_MAX_DRAFTS if tree_auto else base.k_max) + 1
            vocab = self.model.parts.unembed.weight.size(0)
            context = [i % vocab for i in range(1, 65)]
            with torch.no_grad():  # a full batch's step verifies q tokens in every row
                self.costs = cost_model(self.model.trunk, q_max * self.serving.max_batch, context)
        self._thread = threading.Thread(target=self._run, name="multitoken-engine", daemon=True)
        self._thread.start()

    def check(self, request: Request) -> None:
        """Raise :class:`RequestError` for a request the model cannot decode."""
        vocab = self.model.parts.unembed.weight.size(0)
        if any(not 0 <= t < vocab for t in request.prompt):
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        options = dict(max_new_tokens=request.max_tokens, temperature=request.temperature)
        options.update(top_k=request.top_k, top_p=request.top_p, seed=request.seed)
        try:
            cfg = dataclasses.replace(self.base.cfg, **options)
            cfg.validate()
            check_prompts(self.model, [request.prompt], cfg, self.reserve, flag="prompt")
        except MultitokenError as exc:
            flag = (
                (exc.flag or "")
                .lstrip("-")
                .replace("-", "_")
                .replace("max_new_tokens", "max_tokens")
            )
            raise RequestError(exc.message, flag or None) from None

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        """Queue ``request``; ``on_event`` is called from the engine's thread with its tokens
        as they are accepted. Returns the request's id (for :meth:`cancel`)."""
        self.check(request)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        sampling = Sampling(request.temperature, request.top_k, request.top_p)
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down")
            if len(self._queue) >= self.serving.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already; retry later")
            rid = next(self._ids)
            self._queue.append(_Row(rid, request, on_event, sampling, generator))
            self._stats.requests += 1
            self._cond.notify_all()
        return rid

    def cancel(self, rid: int) -> None:
        """The request leaves the queue, or its row the batch before the next step; it gets a
        last event "cancelled". Idempotent; unknown or finished ids are ignored."""
        with self._cond:
            queued = next((r for r in self._queue if r.rid == rid), None)
            if queued is not None:
                self._queue.remove(queued)
            else:
                self._cancelled.add(rid)
                self._cond.notify_all()
        if queued is not None:
            self._finish(queued, Event([], "cancelled"))

    def shutdown(self, grace: float) -> None:
        """Stop taking requests, let those queued and in flight finish for up to ``grace``
        seconds, cancel the rest, stop the thread."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._accepting = False
            while self._busy() and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        with self._cond:
            self._count_recent(0)
            stats = dataclasses.replace(self._stats, histogram=dict(self._stats.histogram))
            stats.queue_length = len(self._queue) + (self._chunked is not None)
            stats.batch_size = len(self._rows)
            stats.tokens_per_s = sum(n for _, n in self._recent) / RATE_WINDOW_S
            stats.tau = stats.tokens_out / max(1, stats.row_passes)
        return stats

    def _count_recent(self, tokens: int) -> None:
        """Tokens emitted now (under the lock); what is older than the window goes."""
        now = time.monotonic()
        if tokens:
            self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine's thread ---------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._queue or self._rows or self._chunked)

    def _run(self) -> None:
        kernel = choose_linear_kernel(self.base.cfg.linear_kernel, self.model)
        with torch.no_grad(), linear_kernels(self.model, kernel):
            while True:
                with self._cond:
                    while not self._busy() and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    newcomers = self._take_newcomers()
                try:
                    self._drop(cancelled)
                    self._admit(newcomers)
                    if self._rows:
                        self._step()
                except Exception as exc:  # a bug must not take the server down: fail the batch
                    log.exception("decoding step failed")
                    self._fail(f"decoding failed: {first_line(exc)}", queued=False)
            self._fail(None, queued=True)

    def _take_newcomers(self) -> list[_Row]:
        """Queued requests that join before the next step (under the lock): as many as free
        rows and the prefill budget allow, whole prompts; a first prompt past the budget is
        taken alone and prefilled in chunks."""
        free = self.serving.max_batch - len(self._rows) - (self._chunked is not None)
        budget, taken = self._prefill_budget(), []
        while self._queue and free > 0 and self._chunked is None:
            size = len(self._queue[0].request.prompt)
            if taken and size > budget:
                break
            taken.append(self._queue.popleft())
            budget -= size
            free -= 1
            if budget <= 0:
                break
        return taken

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill before the next step: ``max_prefill`` while no row is
        decoding; else about as many tokens as the last step verified (the batch's rows times
        its nodes), so that admitting newcomers holds the decoding rows up for no longer than
        about one more step."""
        if not self._rows:
            return self.serving.max_prefill
        return min(self.serving.max_prefill, max(MIN_PREFILL_CHUNK, self._last_step_tokens))

    def _drop(self, cancelled: set[int]) -> None:
        if self._chunked is not None and self._chunked.row.rid in cancelled:
            row, self._chunked = self._chunked.row, None
            self._finish(row, Event([], "cancelled"))
        gone = [b for b, row in enumerate(self._rows) if row.rid in cancelled]
        for b in gone:
            self._finish(self._rows[b], Event([], "cancelled"))
        self._retire(gone)

    def _admit(self, newcomers: list[_Row]) -> None:
        """Prefill ``newcomers`` and join them to the batch; a prompt past the prefill budget
        is prefilled alone, a chunk before each step."""
        if self._chunked is None and newcomers:
            if len(newcomers[0].request.prompt) <= self._prefill_budget():
                prompts = [r.request.prompt for r in newcomers]
                self._join(newcomers, prefill(self.model, prompts, self._plan_of(newcomers)))
                return
            (row,) = newcomers
            self._chunked = _Chunked(row)
        if self._chunked is not None:
            self._prefill_chunk()

    def _prefill_chunk(self) -> None:
        """The next chunk (the prefill budget's size) of the prompt being prefilled alone;
        after its last, the request joins the batch."""
        job = self._chunked
        prompt = job.row.request.prompt
        plan = self._plan_of([job.row])
        end = min(len(prompt), job.done + self._prefill_budget())
        final = end == len(prompt)
        if job.state is None:
            job.state = prefill(self.model, [prompt[:end]], plan, final=final)
        else:
            extend_prefill(self.model, job.state, prompt[job.done : end], plan, final=final)
        job.done = end
        if final:
            self._chunked = None
            self._join([job.row], job.state)

    def _join(self, rows: list[_Row], state: Decoding) -> None:
        """``rows``, prefilled into ``state``, emit their first token and join the batch."""
        state.rows = [r.rid for r in rows]
        first = [[t] for t in read_host(state.pending).tolist()]
        for history, tokens in zip(state.history, first):
            history.extend(tokens)
        with self._cond:
            self._stats.tokens_in += sum(len(r.request.prompt) for r in rows)
            self._stats.row_passes += len(rows)  # the prefill pass gave each its first token
        if self._state is None:
            self._state, self._rows = state, list(rows)
        else:
            join(self.model, self._state, state)
            self._rows = self._rows + list(rows)
        start = len(self._rows) - len(rows)
        done = [start + b for b in self._emit(rows, first)]
        self._retire(done)
        self._plan = self._plan_of(self._rows) if self._rows else None

    def _step(self) -> None:
        state, plan = self._state, self._plan
        source = self._source(len(self._rows))
        clock = self.costs.clock if self.costs is not None else time.perf_counter
        watch = Stopwatch(state.tokens.device, clock)
        start = clock()
        proposal, accepted = step(self.model, state, plan, source, watch)
        self._last_step_tokens = len(self._rows) * proposal.size
        done = self._emit(self._rows, accepted.tokens)
        observe_drafting(source, proposal, watch.take())
        counts = accepted.counts
        with self._cond:
            self._stats.steps += 1
            self._stats.draft_steps += proposal.depth > 0
            self._stats.row_passes += len(counts)
            self._stats.drafts_accepted += sum(counts) - len(counts)
            for n in counts:
                self._stats.histogram[n - 1] = self._stats.histogram.get(n - 1, 0) + 1
        self._retire(done)
        source.observe_step(clock() - start, sum(counts) / len(counts))

    def _source(self, rows: int) -> DraftSource:
        """The draft source for a batch of ``rows``: what an automatic mode learnt carries
        over between the steps of batches of about that size (a step's time depends on it;
        sizes 1, 2, 3-4, 5-8, ... share one, so that each learns from enough steps while
        requests come and go)."""
        size = 1 << (rows - 1).bit_length()
        if size not in self._sources:
            self._sources[size] = draft_source(self.model, self.base, self.costs, size)
        return self._sources[size]

    def _emit(self, rows: list[_Row], fresh: list[list[int]]) -> list[int]:
        """Each row's new tokens to its request, up to its max_tokens and through a stop
        token; returns the indices (into ``rows``) of those that finished."""
        done = []
        for b, (row, tokens) in enumerate(zip(rows, fresh)):
            request = row.request
            tokens = tokens[: request.max_tokens - row.emitted]
            cut = next((i for i, t in enumerate(tokens) if t in request.stop_ids), None)
            if cut is not None:
                tokens = tokens[: cut + 1]
            row.emitted += len(tokens)
            finish = "stop" if cut is not None else None
            if finish is None and row.emitted >= request.max_tokens:
                finish = "length"
            with self._cond:
                self._stats.tokens_out += len(tokens)
                self._count_recent(len(tokens))
            if finish is not None:
                done.append(b)
                self._finish(row, Event(tokens, finish))
            else:
                self._send(row, Event(tokens))
        return done

    def _retire(self, done: list[int]) -> None:
        if not done:
            return
        retire(self.model, self._state, done)
        gone = set(done)
        self._rows = [row for b, row in enumerate(self._rows) if b not in gone]
        if not self._rows:
            self._state = None
        self._plan = self._plan_of(self._rows) if self._rows else None

    def _plan_of(self, rows: list[_Row]) -> Plan:
        """The plan of a batch of ``rows``: the engine's, with each row's sampling and
        generator (one :class:`Sampling` where every row has the same) and room for the
        longest request's tokens."""
        settings = {row.sampling for row in rows}
        sampling = (
            settings.pop() if len(settings) == 1 else RowSampling(tuple(r.sampling for r in rows))
        )
        gen = None if sampling.greedy else RowGenerators(tuple(r.generator for r in rows))
        longest = max(r.request.max_tokens for r in rows)
        cfg = dataclasses.replace(self.base.cfg, max_new_tokens=longest)
        return dataclasses.replace(self.base, cfg=cfg, sampling=sampling, gen=gen)

    def _send(self, row: _Row, event: Event) -> None:
        try:
            row.on_event(event)
        except Exception:  # a caller's callback must not stop the batch
            log.exception("a request's callback failed; cancelling it")
            with self._cond:
                self._cancelled.add(row.rid)

    def _finish(self, row: _Row, event: Event) -> None:
        with self._cond:
            self._stats.finished += 1
            self._cond.notify_all()  # shutdown waits for the batch to drain
        self._send(row, event)

    def _fail(self, error: str | None, queued: bool) -> None:
        """Every request in flight (and with ``queued``, those waiting) ends: "error" with
        ``error``, or "cancelled" (None: shutting down)."""
        with self._cond:
            rows = list(self._rows)
            if self._chunked is not None:
                rows.append(self._chunked.row)
            if queued:
                rows += list(self._queue)
                self._queue.clear()
            self._rows, self._state, self._plan, self._chunked = [], None, None, None
        for row in rows:
            self._finish(row, Event([], "error" if error else "cancelled", error))
