"""The Prometheus exposition (multitoken.serve.metrics): the engine's statistics as read at
scrape time, and the HTTP side's histograms, parseable by Prometheus's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from multitoken.serve.metrics import Metrics
from multitoken.serve.requests import EngineStats


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_engine_statistics_are_read_at_each_scrape():
    stats = EngineStats(
        requests=5,
        finished=3,
        tokens_in=40,
        tokens_out=90,
        steps=30,
        draft_steps=12,
        row_passes=45,
        drafts_accepted=45,
        queue_length=2,
        batch_size=3,
        tokens_per_s=12.5,
        tau=2.0,
        histogram={0: 10, 1: 20, 3: 15},
    )
    current = [stats]
    metrics = Metrics(lambda: current[0])
    got = samples(metrics)
    assert got["multitoken_requests_total", ()] == 5
    assert got["multitoken_prompt_tokens_total", ()] == 40
    assert got["multitoken_generation_tokens_total", ()] == 90
    assert got["multitoken_tau", ()] == 2.0
    assert got["multitoken_steps_total", ()] == 30
    assert got["multitoken_draft_steps_total", ()] == 12
    assert got["multitoken_tokens_per_second", ()] == 12.5
    assert got["multitoken_drafts_accepted_per_step", ()] == 1.0
    assert got["multitoken_queue_length", ()] == 2 and got["multitoken_batch_size", ()] == 3
    name = "multitoken_accepted_drafts_per_row_step"
    assert got[f"{name}_bucket", (("le", "1.0"),)] == 30  # cumulative: 10 + 20
    assert got[f"{name}_bucket", (("le", "+Inf"),)] == 45
    assert got[f"{name}_sum", ()] == 20 + 45
    current[0] = EngineStats(requests=6)
    assert samples(metrics)["multitoken_requests_total", ()] == 6


def test_latencies_are_histograms_by_endpoint_and_registries_are_per_app():
    first, second = Metrics(EngineStats), Metrics(EngineStats)
    first.latency.labels("chat").observe(0.3)
    first.ttft.labels("chat").observe(0.01)
    first.refused.labels("429").inc()
    got = samples(first)
    assert got["multitoken_request_latency_seconds_count", (("endpoint", "chat"),)] == 1
    key = ("multitoken_time_to_first_token_seconds_bucket", (("endpoint", "chat"), ("le", "0.05")))
    assert got[key] == 1
    assert got["multitoken_http_errors_total", (("status", "429"),)] == 1
    assert ("multitoken_request_latency_seconds_count", (("endpoint", "chat"),)) not in samples(
        second
    )
