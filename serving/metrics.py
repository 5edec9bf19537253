"""Prometheus metrics for the server, served at ``GET /metrics``.

One ``ServingMetrics`` per app, each with its own registry (two apps in one process,
as in the tests, never share counters). Requests are labelled by route template
(``/v1/items/{item_id}/similar``, never the raw path, so ids cannot blow up the
label set); stages are ``decode``, ``embed`` and ``search``; the micro-batchers
report their queue depth and batch sizes; the served versions are an info gauge.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.serving.head import client_method

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # "{item_id:path}" -> "{item_id}", as in the OpenAPI spec
# The scope key of when a request arrived, set by a layer in front of the metrics that may make
# it wait (``uploads.LargeBodySlots``): its latency then counts that wait, as its client saw it.
ARRIVED_S = "lookalike.arrived_s"


def arrival_time(scope: Scope) -> float:
    """``time.perf_counter()`` when the request of ``scope`` arrived (now, unless recorded)."""
    return scope.get(ARRIVED_S) or time.perf_counter()


class ServingMetrics:
    """The server's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lookalike_requests", "HTTP requests answered", ["endpoint", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "lookalike_request_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.stage_seconds = Histogram(
            "lookalike_stage_seconds", "time per query stage (decode, embed, search; upload_wait: a large upload's wait for its slot)", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_size = Histogram(
            "lookalike_batch_size", "items per micro-batch", ["batcher"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("lookalike_queue_depth", "items waiting in or running in a micro-batch", ["batcher"], registry=r)
        self.index_info = Gauge(
            "lookalike_index_info", "1 for the index and model being served", ["index_version", "model_version"], registry=r
        )
        self.index_items = Gauge("lookalike_index_items", "items in the served index", registry=r)
        self.reloads = Counter("lookalike_reloads", "hot-swap attempts by outcome (unchanged: an admin reload of the served version; the watcher's checks that find CURRENT unchanged are not counted)", ["outcome"], registry=r)
        self._stage_observers: dict[str, Callable[[float], None]] = {}
        self._request_observers: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}

    def watch_queue(self, batcher: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(batcher).set_function(depth)

    def batch_observer(self, batcher: str) -> Callable[[int], None]:
        histogram = self.batch_size.labels(batcher)
        return histogram.observe

    def served(self, index_version: str, model_version: str, item_count: int) -> None:
        self.index_info.clear()
        self.index_info.labels(index_version, model_version).set(1)
        self.index_items.set(item_count)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(name, time.perf_counter() - started)

    def observe_stage(self, name: str, seconds: float) -> None:
        self.stage_observer(name)(seconds)

    def stage_observer(self, name: str) -> Callable[[float], None]:
        """``observe(seconds)`` for stage ``name`` (the labelled child looked up once, not per call)."""
        observe = self._stage_observers.get(name)
        if observe is None:
            observe = self._stage_observers[name] = self.stage_seconds.labels(name).observe
        return observe

    def request_observers(self, endpoint: str, method: str, status: int) -> tuple[Callable[[], None], Callable[[float], None]]:
        """(count, observe latency) for requests to ``endpoint``, looked up once per label set."""
        key = (endpoint, method, status)
        observers = self._request_observers.get(key)
        if observers is None:
            observers = self._request_observers[key] = (
                self.requests.labels(endpoint, method, str(status)).inc,
                self.request_seconds.labels(endpoint).observe,
            )
        return observers

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting requests and timing them per route template."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = arrival_time(scope)
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            count, observe = self.metrics.request_observers(endpoint_of(scope), client_method(scope), status)
            count()
            observe(time.perf_counter() - started)


@lru_cache(maxsize=1024)
def _endpoint(path: str) -> str:
    """A route's label: convertors dropped (as in the OpenAPI spec) and a trailing slash too
    (``.../similar/`` is the same resource as ``.../similar``: one series)."""
    return _CONVERTOR.sub(r"{\1}", path).rstrip("/") or "/"


def endpoint_of(scope: Scope) -> str:
    """The ``endpoint`` label of a request: its route's template, as in the OpenAPI spec.

    FastAPI records the route of its own endpoints in the scope, not of plain Starlette
    routes (``/openapi.json``, ``/docs``, mounts): those are matched here against the app's
    routes. A path no route matches is ``unmatched``."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", ()):
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    return _endpoint(getattr(route, "path", None) or "unmatched")
