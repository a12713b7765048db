"""The server's Prometheus metrics, in a ``CollectorRegistry`` of their own (one per app, never the global one).

Counters: ``dgemma_requests_total{status}`` (ok / error / aborted / rejected), ``dgemma_generated_tokens_total``,
``dgemma_denoising_steps_total`` (row-steps), ``dgemma_prefix_cache_hit_tokens_total``. Gauges, read at scrape
time from the core thread's last counts: ``dgemma_queue_depth``, ``dgemma_running_requests``. Histograms:
``dgemma_batch_rows`` (rows of each decoder pass), ``dgemma_request_latency_seconds``,
``dgemma_time_to_first_canvas_seconds``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STATUSES = ("ok", "error", "aborted", "rejected")
_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, running: Callable[[], float] = lambda: 0):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("dgemma_requests", "HTTP generation requests by outcome", ["status"], registry=r)
        for status in STATUSES:
            self.requests.labels(status=status)
        self.generated = Counter("dgemma_generated_tokens", "output tokens generated", registry=r)
        self.steps = Counter("dgemma_denoising_steps", "denoising steps, summed over rows", registry=r)
        self.prefix_hits = Counter("dgemma_prefix_cache_hit_tokens", "prompt tokens served by the prefix cache",
                                   registry=r)
        self.queue_depth = Gauge("dgemma_queue_depth", "requests waiting for a slot", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.running = Gauge("dgemma_running_requests", "requests holding a slot", registry=r)
        self.running.set_function(running)
        self.batch_rows = Histogram("dgemma_batch_rows", "rows per decoder pass", buckets=_ROWS, registry=r)
        self.latency = Histogram("dgemma_request_latency_seconds", "time from request to its last byte",
                                 buckets=_SECONDS, registry=r)
        self.first_canvas = Histogram("dgemma_time_to_first_canvas_seconds",
                                      "time from request to its first committed canvas", buckets=_SECONDS, registry=r)

    def request(self, status: str, latency: float | None = None) -> None:
        self.requests.labels(status=status).inc()
        if latency is not None:
            self.latency.observe(latency)

    def on_step(self, deltas: dict[str, int], rows: int) -> None:
        """After a core step: counter deltas (``generated_tokens``, ``denoise_steps``, ``prefix_hit_tokens``)
        and the rows of its decoder pass (0: none)."""
        self.generated.inc(max(0, deltas.get("generated_tokens", 0)))
        self.steps.inc(max(0, deltas.get("denoise_steps", 0)))
        self.prefix_hits.inc(max(0, deltas.get("prefix_hit_tokens", 0)))
        if rows > 0:
            self.batch_rows.observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
