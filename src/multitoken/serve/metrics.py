"""``GET /metrics``: the server's Prometheus text.

The engine's counters and gauges (:class:`~multitoken.serve.requests.EngineStats`) are read
once per scrape by a custom collector, so the engine keeps one record of them and the exposition
is never stale; the latencies only the HTTP side sees (whole request, time to first token) are
histograms it observes. Each app has its own registry, so two servers in one process (tests) do
not mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from multitoken.serve.requests import EngineStats

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """The engine's statistics as metric families, read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        counters = (
            ("multitoken_requests", "requests submitted to the engine", s.requests),
            ("multitoken_requests_finished", "requests the engine finished", s.finished),
            ("multitoken_prompt_tokens", "prompt tokens prefilled", s.tokens_in),
            ("multitoken_generation_tokens", "tokens generated", s.tokens_out),
            ("multitoken_steps", "decoding steps (one trunk pass each)", s.steps),
            ("multitoken_draft_steps", "decoding steps that verified drafts", s.draft_steps),
            (
                "multitoken_drafts_accepted",
                "drafts accepted, over rows and steps",
                s.drafts_accepted,
            ),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        per_step = s.drafts_accepted / s.row_passes if s.row_passes else 0.0
        gauges = (
            (
                "multitoken_tokens_per_second",
                "tokens generated per second, recently",
                s.tokens_per_s,
            ),
            ("multitoken_tau", "tokens per row per decoding step (tau), whole run", s.tau),
            ("multitoken_drafts_accepted_per_step", "mean drafts accepted per row-step", per_step),
            ("multitoken_queue_length", "requests waiting for a row", s.queue_length),
            ("multitoken_batch_size", "requests being decoded", s.batch_size),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield _accepted_histogram(s)


def _accepted_histogram(s: EngineStats) -> HistogramMetricFamily:
    """Drafts accepted per row-step as a Prometheus histogram (bucket ``le=k``: row-steps that
    accepted at most k drafts)."""
    buckets, seen = [], 0
    for accepted in sorted(s.histogram):
        seen += s.histogram[accepted]
        buckets.append((str(float(accepted)), seen))
    buckets.append(("+Inf", seen))
    return HistogramMetricFamily(
        "multitoken_accepted_drafts_per_row_step",
        "drafts accepted by one row in one decoding step",
        buckets=buckets,
        sum_value=sum(k * n for k, n in s.histogram.items()),
    )


class Metrics:
    """One app's registry: the engine's statistics and the HTTP side's own measurements."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.latency = Histogram(
            "multitoken_request_latency_seconds",
            "time from a completion request's arrival to its last token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "multitoken_time_to_first_token_seconds",
            "time from a completion request's arrival to its first token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "multitoken_http_errors",
            "requests answered with an error, by HTTP status",
            ["status"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
