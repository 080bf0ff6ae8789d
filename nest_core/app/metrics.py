"""``GET /metrics`` of ``nest serve``: Prometheus text format (``prometheus-client``).

What an operator watches: requests by route and status (``nest_requests_total``), their
latency to the last byte, streams included (``nest_request_seconds``), requests in flight,
answers decoding and waiting (``nest_decoding``, ``nest_queued``), and what the answers
were: ``nest_answers_total``, ``nest_abstentions_total`` (the documents did not support an
answer), ``nest_cited_answers_total`` (with at least one citation) and
``nest_generated_tokens_total``; ``nest_forward_calls_total`` (the forwards the answers
asked for) and ``nest_model_forwards`` (the model calls that ran them: fewer when
concurrent answers are batched), so tokens per model call is one division. Routes are the
app's path templates (``unmatched`` for a path no route serves), so a client cannot grow the
label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from nest_core.types import NestResult

# seconds: a refusal takes milliseconds, an answer on a CPU seconds to minutes
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """One server's metrics, in a registry of its own (two apps in one process, as in
    tests, count apart)."""

    def __init__(self, decoding: Callable[[], float], queued: Callable[[], float],
                 model_forwards: Callable[[], float | None] | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("nest_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.seconds = Histogram("nest_request_seconds", "Time to the last byte of the "
                                 "response (a stream's last event)", ["route"],
                                 buckets=BUCKETS, registry=registry)
        self.in_flight = Gauge("nest_requests_in_flight", "HTTP requests being handled",
                               registry=registry)
        Gauge("nest_decoding", "Answers decoding now", registry=registry).set_function(decoding)
        Gauge("nest_queued", "Admitted requests waiting for an answer slot",
              registry=registry).set_function(queued)
        self.answers = Counter("nest_answers", "Answers decoded (abstentions included)",
                               registry=registry)
        self.abstentions = Counter("nest_abstentions", "Answers that said the documents do "
                                   "not support one", registry=registry)
        self.cited = Counter("nest_cited_answers", "Answers with at least one citation",
                             registry=registry)
        self.tokens = Counter("nest_generated_tokens", "Tokens of the answers",
                              registry=registry)
        self.calls = Counter("nest_forward_calls", "Model forwards the answers asked for",
                             registry=registry)
        self.forward_calls = 0
        batched = model_forwards or (lambda: None)
        Gauge("nest_model_forwards", "Model calls that ran the answers' forwards (with "
              "batching, one call runs several answers' forwards)", registry=registry) \
            .set_function(lambda: _first(batched(), self.forward_calls))

    def answered(self, result: NestResult) -> None:
        """Count one answer (plain or at the end of its stream)."""
        self.answers.inc()
        self.tokens.inc(len(result.token_ids))
        self.calls.inc(result.stats.lm_forwards)
        self.forward_calls += result.stats.lm_forwards
        if result.abstained:
            self.abstentions.inc()
        if result.cited_spans():
            self.cited.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _first(value: float | None, otherwise: float) -> float:
    return otherwise if value is None else value


class MetricsMiddleware:
    """ASGI middleware that counts every HTTP request when its response has been sent
    (so a stream's latency runs to its last event)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: the app failed before answering

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.seconds.labels(name).observe(time.perf_counter() - started)
