"""Prometheus metrics (names are part of the contract), the request middleware, /metrics.

With ``WORKERS>1`` every worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``
(set, and wiped, by the supervisor before the workers start) and ``/metrics`` on any worker
aggregates all of them, so a scrape through the shared port sees the whole replica set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from . import keys
from .logs import AccessLog

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_FLUSH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FLUSH_KEYS_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNMATCHED = "unmatched"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of one app, in a registry of its own (tests build many apps per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by method, route template and status code.",
            ["method", "route", "status_code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled, sampled twice a second.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.increments = Counter("increments", "Increments acknowledged with 202.", registry=r)
        self.flush_duration = Histogram(
            "increment_flush_duration_seconds",
            "Time to apply one batch to Postgres.",
            buckets=_FLUSH_SECONDS_BUCKETS,
            registry=r,
        )
        self.flush_keys = Histogram(
            "increment_flush_keys",
            "Distinct keys in one applied batch.",
            buckets=_FLUSH_KEYS_BUCKETS,
            registry=r,
        )
        self.flush_failures = Counter(
            "increment_flush_failures",
            "Flush attempts that failed (Postgres unreachable, timeout, unknown outcome).",
            registry=r,
        )
        self.pending_keys = Gauge(
            "increment_pending_keys",
            "Distinct keys held in memory, not yet persisted.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.persist_lag = Gauge(
            "increment_persist_lag_seconds",
            "Age of the oldest acknowledged increment not yet persisted.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.backpressure_rejections = Counter(
            "increment_backpressure_rejections",
            "Increments to new keys refused with 503 because MAX_PENDING_KEYS was reached.",
            registry=r,
        )
        self.overflow_rejected = Counter(
            "increment_overflow_rejected",
            "Per-key deltas rejected at flush because the total would leave the bigint range.",
            registry=r,
        )
        self.loop_lag = Gauge(
            "event_loop_lag_seconds",
            "How late the event loop ran a timer, sampled twice a second.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.logins = Counter(
            "session_logins", "Login attempts by outcome.", ["outcome"], registry=r
        )
        self.signups = Counter(
            "user_signups", "Account creations by outcome.", ["outcome"], registry=r
        )
        self.session_cache = Counter(
            "session_cache_lookups",
            "Session lookups answered by the local cache (hit) or by Redis (miss).",
            ["result"],
            registry=r,
        )
        # Every known label value from the start: a series that appears only at its first
        # event hides that event from rate() and increase().
        for outcome in ("success", "failure", "throttled"):
            self.logins.labels(outcome)
        for outcome in ("created", "duplicate", "throttled"):
            self.signups.labels(outcome)
        for result in ("hit", "miss"):
            self.session_cache.labels(result)
        self.requests_in_flight = 0  # sampled into `in_flight` by sampler_ctx
        # .labels() parses and hashes its arguments on every call; the label sets are few.
        self._request_children: dict[tuple[str, str, int], Histogram] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        child = self._request_children.get((method, route, status))
        if child is None:
            child = self.requests.labels(method, route, str(status))
            self._request_children[(method, route, status)] = child
        child.observe(seconds)

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]  # unannotated upstream
        return generate_latest(registry)


def route_label(request: web.Request) -> str:
    """The route template, never the raw path: label cardinality stays bounded."""
    resource = request.match_info.route.resource
    return _UNMATCHED if resource is None else resource.canonical


class RequestIds:
    """Ids for requests that come without one: unique, not secret. A random prefix per
    process and a counter cost no system call per request, unlike uuid4."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count(1)

    def __call__(self, request: web.Request) -> str:
        given = request.headers.get("X-Request-ID", "")
        # Keep a caller's id only if it is short and printable; it ends up in every log line.
        if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
            return given
        return f"{self._prefix}{next(self._next):08x}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def observe_middleware(
    metrics: Metrics, access_log: AccessLog | None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Times every request, counts it in flight, tags it with a request id and logs it."""
    request_id = RequestIds()

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id(request)
        # A plain count, sampled into the gauge: with WORKERS>1 every gauge update is a locked
        # write to a shared file, twice per request.
        metrics.requests_in_flight += 1
        status = 500  # what the client sees if the handler is cancelled mid-way
        try:
            response = await handler(request)
            status = response.status
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            metrics.requests_in_flight -= 1
            duration = time.perf_counter() - started
            method = request.method if request.method in _METHODS else "OTHER"
            route = route_label(request)
            metrics.observe_request(method, route, status, duration)
            if access_log is not None:
                access_log.write(
                    {
                        "event": "request",
                        "method": method,
                        "route": route,
                        "path": request.path[:256],
                        "status": status,
                        "duration": round(duration, 6),
                        "request_id": rid,
                    }
                )

    return observe


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Twice a second: how late the event loop wakes up (the cost every request pays for a
    busy loop), how many requests are in flight, and the access log's lines out to stdout."""
    metrics = app[keys.METRICS]
    access_log = app.get(keys.ACCESS_LOG)
    interval = 0.5

    async def sample() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(interval)
            metrics.loop_lag.set(max(0.0, time.perf_counter() - before - interval))
            metrics.in_flight.set(metrics.requests_in_flight)
            if access_log is not None:
                access_log.flush()

    task = asyncio.create_task(sample(), name="sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if access_log is not None:
        access_log.flush()
