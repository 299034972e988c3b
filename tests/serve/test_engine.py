"""The serving engine (multitoken.serve.engine): continuous batching is exact.

Requests join the running batch between steps (some prefilled in chunks) and leave it when
done; a greedy request's tokens must be ``generate``'s for its prompt alone, whatever else is
in flight and whatever each other row samples with; sampled requests must follow the trunk's
law; seeded ones repeat; cancelled ones free their rows; bad requests are refused up front.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import (
    assert_chi_square_fits,
    far_heads,
    three_token_counts,
    three_token_law,
)

from multitoken.config import GenerateConfig, ServeConfig
from multitoken.decode.api import generate
from multitoken.decode.sampling import Sampling
from multitoken.serve.engine import Engine, Event, QueueFull, Request, RequestError, Unavailable

PROMPTS = [
    [5, 6, 7, 8, 9],
    [3],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    list(range(3, 40)),  # past max_prefill below: prefilled in chunks
    [7, 7, 7],
    [40, 41],
]
LENGTHS = [30, 17, 25, 40, 12, 21]


class Collector:
    """Each request's events, and a way to wait for all of them to finish."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, str] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Condition(self.lock)

    def callback(self, i: int):
        def on_event(event: Event) -> None:
            with self.lock:
                self.tokens.setdefault(i, []).extend(event.tokens)
                if event.finish is not None:
                    self.finish[i] = event.finish
                    self.all_done.notify_all()

        return on_event

    def wait(self, n: int, timeout: float = 120.0) -> None:
        with self.lock:
            assert self.all_done.wait_for(lambda: len(self.finish) >= n, timeout), self.finish


def serve(model, requests: list[Request], decoding=None, stagger: float = 0.0, **serving):
    """Submit ``requests`` (one every ``stagger`` seconds) to a fresh engine; returns each
    request's tokens and finish reason once all are done, and the engine's stats."""
    engine = Engine(model, decoding or GenerateConfig(), ServeConfig(**serving))
    engine.start()
    got = Collector()
    try:
        for i, request in enumerate(requests):
            engine.submit(request, got.callback(i))
            time.sleep(stagger)
        got.wait(len(requests))
    finally:
        engine.shutdown(0)
    out = [(got.tokens.get(i, []), got.finish[i]) for i in range(len(requests))]
    return out, engine.stats()


@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
@pytest.mark.parametrize("tree", [None, "chain", "3,2"])
def test_greedy_requests_equal_generate_whatever_else_is_in_flight(trained, family, tree):
    """Requests of different lengths join a batch of 3 rows as others leave it (one prompt
    longer than max_prefill is prefilled in chunks), next to sampled rows: every greedy row's
    tokens are ``generate``'s for its prompt alone."""
    model = trained(family)
    decoding = GenerateConfig(tree=tree)
    requests = [Request(p, n) for p, n in zip(PROMPTS, LENGTHS)]
    requests += [Request(p, 15, temperature=0.8, top_k=20) for p in PROMPTS[:3]]
    out, stats = serve(model, requests, decoding, stagger=0.002, max_batch=3, max_prefill=16)
    for (tokens, finish), p, n in zip(out, PROMPTS, LENGTHS):
        assert tokens == generate(model, [p], decoding, max_new_tokens=n).tokens[0]
        assert finish == "length"
    assert [len(t) for t, _ in out[len(PROMPTS) :]] == [15] * 3
    assert stats.tau > 1.0  # trained heads: the batch speculated and accepted drafts
    assert stats.tokens_out == sum(LENGTHS) + 45
    assert stats.batch_size == 0 and stats.queue_length == 0


def test_plain_serving_equals_generate(trained):
    model = trained("bpd")
    decoding = GenerateConfig(speculate=False)
    requests = [Request(p, n) for p, n in zip(PROMPTS, LENGTHS)]
    out, stats = serve(model, requests, decoding, max_batch=4, max_prefill=16)
    for (tokens, _), p, n in zip(out, PROMPTS, LENGTHS):
        assert tokens == generate(model, [p], decoding, max_new_tokens=n).tokens[0]
    assert stats.tau == 1.0 and stats.drafts_accepted == 0


def test_a_stop_token_ends_a_request_and_is_its_last(trained):
    model = trained("bpd")
    full = generate(model, [PROMPTS[0]], max_new_tokens=30).tokens[0]
    stop = full[9]
    out, _ = serve(model, [Request(PROMPTS[0], 30, stop_ids=frozenset({stop}))])
    tokens, finish = out[0]
    assert finish == "stop"
    assert tokens == full[: full.index(stop) + 1]


@pytest.mark.parametrize(
    "decoding",
    [GenerateConfig(tree="chain", draft_len=2), GenerateConfig()],
    ids=["chain-q", "auto-tree"],
)
def test_sampled_rows_follow_the_trunks_law_next_to_greedy_and_top_k_rows(decoding):
    """Far heads on a sharp 4-token trunk (drafts rejected, residuals sampled): requests at
    temperature 1, at top-k 2 and greedy share every batch; the sampled ones' first three
    tokens follow the trunk's laws (chi-square), the greedy ones are all the argmax path."""
    model = far_heads("bpd")
    prompt = [1, 2, 3]
    plain, top2 = Request(prompt, 3, temperature=1.0), Request(prompt, 3, temperature=1.0, top_k=2)
    greedy = Request(prompt, 3)
    requests = [plain, top2, greedy] * 1200
    out, _ = serve(model, requests, decoding, max_batch=32, max_queue=4000)
    argmax_path = generate(model, [prompt], max_new_tokens=3).tokens[0]
    assert all(t == argmax_path for t, _ in out[2::3])
    for kind, sampling in ((0, Sampling(1.0)), (1, Sampling(1.0, top_k=2))):
        law = three_token_law(model.trunk, prompt, 4, sampling)
        assert_chi_square_fits(three_token_counts([t for t, _ in out[kind::3]], 4), law)


def test_a_seeded_request_repeats_whatever_shares_its_batch(trained):
    """With fixed drafts (a chain of K = 2) each row draws from its own generator: the same
    seeded request gives the same tokens alone and among other sampled requests."""
    model = trained("meta")
    decoding = GenerateConfig(tree="chain", draft_len=2)
    seeded = Request(PROMPTS[2], 24, temperature=1.0, seed=1234)
    alone, _ = serve(model, [seeded], decoding)
    others = [Request(p, 20, temperature=0.7) for p in PROMPTS]
    crowded, _ = serve(model, [*others[:3], seeded, *others[3:]], decoding, max_batch=8)
    assert crowded[3][0] == alone[0][0]
    fresh, _ = serve(model, [Request(PROMPTS[2], 24, temperature=1.0)] * 2, decoding)
    assert fresh[0][0] != fresh[1][0]  # unseeded: fresh randomness each


def test_a_cancelled_request_frees_its_row_and_the_others_stay_exact(trained):
    model = trained("deepseek")
    engine = Engine(model, GenerateConfig(), ServeConfig(max_batch=4))
    engine.start()
    got = Collector()
    try:
        long = engine.submit(Request(PROMPTS[0], 100), got.callback(0))
        engine.submit(Request(PROMPTS[2], 40), got.callback(1))
        queued = [engine.submit(Request(p, 5), got.callback(2 + i)) for i, p in enumerate(PROMPTS)]
        engine.cancel(queued[-1])  # still waiting (max_batch 4): leaves the queue
        deadline = time.monotonic() + 30
        while len(got.tokens.get(0, [])) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.cancel(long)
        engine.cancel(long)  # idempotent
        got.wait(2 + len(PROMPTS))
        stats = engine.stats()
    finally:
        engine.shutdown(0)
    assert got.finish[0] == "cancelled" and got.finish[2 + len(PROMPTS) - 1] == "cancelled"
    assert len(got.tokens[0]) < 100
    assert got.tokens[1] == generate(model, [PROMPTS[2]], max_new_tokens=40).tokens[0]
    assert stats.batch_size == 0 and stats.queue_length == 0
    assert stats.finished == stats.requests == 2 + len(PROMPTS)


def test_a_full_queue_refuses_and_bad_requests_are_refused_up_front(trained):
    model = trained("bpd")
    engine = Engine(model, GenerateConfig(), ServeConfig(max_batch=1, max_queue=2))
    context = model.trunk.config.max_position_embeddings
    for bad, field in [
        (Request([], 4), "prompt"),
        (Request([1, 2], 0), "max_tokens"),
        (Request([1, 2], context), "prompt"),
        (Request([1, 999], 4), "prompt"),
        (Request([1, 2], 4, temperature=-1.0), "temperature"),
        (Request([1, 2], 4, temperature=1.0, top_p=0.0), "top_p"),
    ]:
        with pytest.raises(RequestError) as refused:
            engine.submit(bad, lambda event: None)
        assert refused.value.flag == field
    # not started: nothing leaves the queue
    engine.submit(Request([1, 2], 4), lambda event: None)
    engine.submit(Request([1, 2], 4), lambda event: None)
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], 4), lambda event: None)
    assert engine.stats().queue_length == 2


def test_shutdown_lets_requests_finish_within_the_grace_then_cancels():
    model = far_heads("bpd")
    engine = Engine(model, GenerateConfig(), ServeConfig(max_batch=2))
    engine.start()
    got = Collector()
    engine.submit(Request([1, 2, 3], 20), got.callback(0))
    engine.shutdown(grace=60)  # finishes what is in flight
    assert got.finish == {0: "length"} and len(got.tokens[0]) == 20
    with pytest.raises(Unavailable):
        engine.submit(Request([1, 2, 3], 20), got.callback(1))
    assert not engine.alive

    engine = Engine(model, GenerateConfig(), ServeConfig(max_batch=1))
    engine.submit(Request([1, 2, 3], 20), got.callback(2))  # never started: cancelled
    engine.start()
    engine.submit(Request([1, 2, 3], 60), got.callback(3))
    engine.shutdown(grace=0)
    got.wait(3)  # requests 0, 2 and 3: each got a last event
    assert got.finish[2] in ("cancelled", "length") and got.finish[3] in ("cancelled", "length")
    assert "cancelled" in (got.finish[2], got.finish[3])  # no grace: not both could finish


def test_a_failing_callback_cancels_its_request_only(trained):
    model = trained("bpd")

    def broken(event: Event) -> None:
        raise RuntimeError("client gone")

    engine = Engine(model, GenerateConfig(), ServeConfig())
    engine.start()
    got = Collector()
    try:
        engine.submit(Request(PROMPTS[0], 30), broken)
        engine.submit(Request(PROMPTS[2], 30), got.callback(0))
        got.wait(1)
        deadline = time.monotonic() + 10
        while engine.stats().batch_size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().batch_size == 0
    finally:
        engine.shutdown(0)
    assert got.tokens[0] == generate(model, [PROMPTS[2]], max_new_tokens=30).tokens[0]
    assert torch.is_grad_enabled()  # the engine's no_grad stays on its own thread
