"""Prometheus metrics (names are part of the contract), /metrics, and the sampler.

Two kinds of metric, by who updates them. What a request counts (its latency, increments,
session lookups, logins, refusals) is counted in plain numbers of the process
(``localmetrics.py``): no lock, no shared file on the request path. What background tasks set
(the flusher, the sampler) goes through prometheus_client.

With ``WORKERS>1`` every worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``
(set, and wiped, by the supervisor before the workers start) and ``/metrics`` on any worker
aggregates all of them, so a scrape through the shared port sees the whole replica set; the
request-path numbers of the other workers are at most half a second old there (the sampler
writes them).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .localmetrics import LocalCollector, LocalCounter, LocalHistogram, write_snapshot
from .logs import AccessLog

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_FLUSH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FLUSH_KEYS_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of one app, in a registry of its own (tests build many apps per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # -- counted by requests, in plain numbers of this process --
        self.requests = LocalHistogram(
            "http_request_duration_seconds",
            "HTTP request duration by method, route template and status code.",
            ["method", "route", "status_code"],
            buckets=_LATENCY_BUCKETS,
        )
        self.increments = LocalCounter("increments", "Increments acknowledged with 202.")
        self.backpressure_rejections = LocalCounter(
            "increment_backpressure_rejections",
            "Increments to new keys refused with 503 because MAX_PENDING_KEYS was reached.",
        )
        self.protocol_errors = LocalCounter(
            "http_protocol_errors",
            "Requests aiohttp could not parse and refused before any handler (by error kind).",
            ["error"],
        )
        self.logins = LocalCounter("session_logins", "Login attempts by outcome.", ["outcome"])
        self.signups = LocalCounter("user_signups", "Account creations by outcome.", ["outcome"])
        self.session_cache = LocalCounter(
            "session_cache_lookups",
            "Session lookups answered by the local cache (hit) or by Redis (miss).",
            ["result"],
        )
        self.token_checks = LocalCounter(
            "increment_token_checks",
            "Bearer token checks: answered by the local cache (hit; refresh: a hit that also"
            " looks the token up again in the background), by a lookup (miss), or from the"
            " cache while Postgres is unreachable (stale).",
            ["result"],
        )
        self.token_refusals = LocalCounter(
            "increment_token_refusals",
            "Bearer tokens refused, by reason: malformed, unknown (or revoked), expired, scope"
            " (403), query (a token in the URL), unavailable and busy (503).",
            ["reason"],
        )
        self.token_lookups = LocalCounter(
            "increment_token_lookups",
            "Token lookup statements sent to Postgres (each looks up a batch of tokens).",
        )
        self.token_lookup_tokens = LocalCounter(
            "increment_token_lookup_tokens",
            "Tokens looked up in Postgres (summed over the lookup statements).",
        )
        self.idempotent_replays = LocalCounter(
            "increment_idempotent_replays",
            "Keyed requests found applied already, so not applied again: answered as a replay"
            " on arrival (stage=request) or found at flush (stage=flush).",
            ["stage"],
        )
        self.idempotency_conflicts = LocalCounter(
            "increment_idempotency_conflicts",
            "Keyed requests whose Idempotency-Key was used for another body: refused with 422"
            " on arrival (stage=request) or dropped at flush (stage=flush). Never applied.",
            ["stage"],
        )
        self.durable_requests = LocalCounter(
            "increment_durable_requests",
            "Durable requests (Prefer: durable) by outcome: committed, replay, conflict,"
            " not-sent (503, nothing applied), unknown (503, the group is retried).",
            ["outcome"],
        )
        self.durable_seconds = LocalHistogram(
            "increment_durable_commit_seconds",
            "How long a durable request waited for the commit of its group.",
            [],
            buckets=_LATENCY_BUCKETS,
        )
        self.durable_group_size = LocalHistogram(
            "increment_durable_group_size",
            "Durable requests committed together in one group (group commit).",
            [],
            buckets=_GROUP_SIZE_BUCKETS,
        )
        self.local = (
            self.requests,
            self.durable_requests,
            self.durable_seconds,
            self.durable_group_size,
            self.idempotent_replays,
            self.idempotency_conflicts,
            self.increments,
            self.backpressure_rejections,
            self.protocol_errors,
            self.logins,
            self.signups,
            self.session_cache,
            self.token_checks,
            self.token_refusals,
            self.token_lookups,
            self.token_lookup_tokens,
        )
        r.register(LocalCollector(self.local))
        # -- set by background tasks, through prometheus_client --
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled, sampled twice a second.",
            multiprocess_mode="livesum",
            registry=r,
        )
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
        self.keyed_items_pending = Gauge(
            "increment_keyed_items_pending",
            "Items of keyed requests held in memory, not yet persisted (part of pending keys).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.persist_lag = Gauge(
            "increment_persist_lag_seconds",
            "Age of the oldest acknowledged increment not yet persisted.",
            multiprocess_mode="livemax",
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
        # The process collector of prometheus_client does not work with WORKERS > 1, so each
        # worker samples its own (liveall: one series per live worker, labelled with its pid).
        self.open_fds = Gauge(
            "process_open_fds",
            "Open file descriptors of the worker, sampled twice a second.",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.max_fds = Gauge(
            "process_max_fds",
            "The worker's limit on open file descriptors (RLIMIT_NOFILE, soft).",
            multiprocess_mode="liveall",
            registry=r,
        )
        # Every known label value from the start: a series that appears only at its first
        # event hides that event from rate() and increase().
        for outcome in ("success", "failure", "throttled"):
            self.logins.labels(outcome)
        for outcome in ("created", "duplicate", "throttled"):
            self.signups.labels(outcome)
        for result in ("hit", "miss", "refresh"):
            self.session_cache.labels(result)
        for result in ("hit", "miss", "refresh", "stale"):
            self.token_checks.labels(result)
        for reason in ("malformed", "unknown", "expired", "scope", "unavailable", "busy", "query"):
            self.token_refusals.labels(reason)
        for outcome in ("committed", "replay", "conflict", "not-sent", "unknown"):
            self.durable_requests.labels(outcome)
        for stage in ("request", "flush"):
            self.idempotent_replays.labels(stage)
            self.idempotency_conflicts.labels(stage)
        for kind in ("BadHttpMessage", "BadStatusLine", "LineTooLong", "InvalidHeader"):
            self.protocol_errors.labels(kind)
        self.requests_in_flight = 0  # sampled into `in_flight` by sample()

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]  # unannotated upstream
        registry.register(LocalCollector(self.local, directory))
        return generate_latest(registry)

    def publish(self) -> None:
        """With several workers, write this worker's request-path numbers where the others'
        scrapes read them (the sampler calls this twice a second, and at shutdown)."""
        directory = multiprocess_dir()
        if directory is not None:
            write_snapshot(self.local, directory, os.getpid())


def open_fds() -> int | None:
    """How many file descriptors this process has open (Linux), or None where it cannot tell.

    Listing /proc/self/fd takes a descriptor itself: when none is left, that is the answer."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one the listing held
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return fd_limit()
        raise


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FdWatch:
    """Samples open descriptors into the gauges and says once when they run out.

    When they do, the event loop cannot accept connections, and uvloop (libuv) resets them
    without a word; this is the only sign of it in the log. It speaks again after the count
    has dropped below 90 % of the limit."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.exhausted = False

    def sample(self) -> None:
        used, limit = open_fds(), fd_limit()
        if used is None:
            return
        self.metrics.open_fds.set(used)
        self.metrics.max_fds.set(limit)
        if not self.exhausted and used + 1 >= limit:
            self.exhausted = True
            log.error(
                "out of file descriptors: new connections are being refused",
                extra={"event": "fd-exhausted", "open_fds": used, "max_fds": limit},
            )
        elif self.exhausted and used < 0.9 * limit:
            self.exhausted = False
            log.warning(
                "file descriptors available again",
                extra={"event": "fd-recovered", "open_fds": used, "max_fds": limit},
            )


async def sample(metrics: Metrics, access_log: AccessLog | None) -> None:
    """Twice a second, until cancelled: how late the event loop wakes up (the cost every
    request pays for a busy loop), how many requests are in flight, open file descriptors, and
    the access log's lines out to stdout."""
    fds = FdWatch(metrics)
    fds.sample()
    interval = 0.5
    while True:
        before = time.perf_counter()
        await asyncio.sleep(interval)
        metrics.loop_lag.set(max(0.0, time.perf_counter() - before - interval))
        metrics.in_flight.set(metrics.requests_in_flight)
        metrics.publish()
        fds.sample()
        if access_log is not None:
            access_log.flush()


def publish_final(metrics: Metrics, access_log: AccessLog | None) -> None:
    """Once requests have drained: the final numbers, the last access log lines."""
    metrics.publish()
    if access_log is not None:
        access_log.flush()
