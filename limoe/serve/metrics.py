"""Prometheus metrics for the service: `GET /metrics` in the Prometheus text format.

Every app has its own `prometheus_client.CollectorRegistry` (not the
process-wide default one), so several apps in one process (tests, a
BackgroundServer next to another) count separately. What is exported:

    limoe_http_requests_total{endpoint,method,status}       counter
    limoe_http_request_duration_seconds{endpoint}           histogram, request start -> response sent
    limoe_http_requests_in_progress                         gauge
    limoe_batch_size{kind}                                  histogram, inputs per model batch (text|image)
    limoe_batch_duration_seconds{kind}                      histogram, one forward pass over a batch
    limoe_queue_wait_seconds{kind}                          histogram, submit -> batch start, per request
    limoe_inputs_total{kind}                                counter, inputs embedded (rate() = inputs/s)
    limoe_inputs_per_second{kind}                           gauge, inputs embedded over the last 60 s / 60
    limoe_queue_depth                                       gauge, requests waiting for the model worker

The app adds `MetricsMiddleware`; `GET /metrics` is a route in routes.py.
`endpoint` is the route's path template (`/v1/models/{name}`, not the id sent),
or `other` for paths no route matches, so the label set stays bounded.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.responses import Response
from starlette.routing import Match

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATE_WINDOW_S = 60.0
UNMATCHED = "other"


class InputRate:
    """Inputs per second over the last `window` seconds, per kind (thread-safe)."""

    def __init__(self, kinds, window: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self.events = {kind: deque() for kind in kinds}  # (time, inputs)
        self.lock = threading.Lock()

    def add(self, kind: str, inputs: int) -> None:
        with self.lock:
            self.events[kind].append((self.clock(), inputs))

    def per_second(self) -> dict[str, float]:
        now = self.clock()
        with self.lock:
            for events in self.events.values():
                while events and events[0][0] < now - self.window:
                    events.popleft()
            return {kind: sum(n for _, n in events) / self.window for kind, events in self.events.items()}


class ServiceMetrics:
    """The service's metrics in their own registry; `observe_batch` is the batcher's hook."""

    def __init__(self, kinds=("text", "image")):
        self.registry = CollectorRegistry()
        self.requests = Counter("limoe_http_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("limoe_http_request_duration_seconds",
                                 "Time from request start to the last byte of the response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("limoe_http_requests_in_progress", "HTTP requests being handled now",
                                 registry=self.registry)
        self.batch_size = Histogram("limoe_batch_size", "Inputs per model batch", ["kind"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("limoe_batch_duration_seconds", "One forward pass over a model batch",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("limoe_queue_wait_seconds", "Time a request waited for its model batch",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inputs = Counter("limoe_inputs", "Inputs embedded (texts or images)", ["kind"], registry=self.registry)
        self.rate = InputRate(kinds)
        self.queue_depth = Gauge("limoe_queue_depth", "Requests waiting for the model worker",
                                 registry=self.registry)  # the app sets it to read the batcher's queue
        self.registry.register(_RateCollector(self.rate))
        for kind in kinds:  # every series is there from the first scrape, at zero
            self.batch_size.labels(kind)
            self.batch_seconds.labels(kind)
            self.queue_wait.labels(kind)
            self.inputs.labels(kind)

    def observe_batch(self, kind: str, inputs: int, seconds: float, queue_waits: list[float]) -> None:
        self.batch_size.labels(kind).observe(inputs)
        self.batch_seconds.labels(kind).observe(seconds)
        for wait in queue_waits:
            self.queue_wait.labels(kind).observe(wait)
        self.inputs.labels(kind).inc(inputs)
        self.rate.add(kind, inputs)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _RateCollector:
    def __init__(self, rate: InputRate):
        self.rate = rate

    def collect(self):
        family = GaugeMetricFamily("limoe_inputs_per_second",
                                   f"Inputs embedded per second over the last {RATE_WINDOW_S:g} s", labels=["kind"])
        for kind, value in self.rate.per_second().items():
            family.add_metric([kind], value)
        yield family


class MetricsMiddleware:
    """ASGI middleware: count every HTTP request by route, method and status, and time it."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    @staticmethod
    def endpoint(scope) -> str:
        for route in scope["app"].router.routes:  # the app Starlette put in the scope, as `request.app` reads it
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path matches, the method does not (405)
                return route.path
        return UNMATCHED

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, status = self.endpoint(scope), 500  # an exception that escapes is answered 500
        start = time.perf_counter()

        async def send_recording_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - start)

