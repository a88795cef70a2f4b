"""The write-behind: increments are summed in memory and applied to Postgres in batches.

The whole mechanism lives in this module:

* ``Aggregator`` is the in-memory part, free of I/O: a dict of per-key deltas that the request
  handlers add to, swapped for an empty one when a batch is frozen.
* ``apply_batch`` is the only SQL: ONE statement that records the batch id in
  ``applied_batches`` and adds every delta to ``counters`` with an additive UPSERT. Both happen
  in one implicit transaction, so a retry of a batch whose commit outcome was unknown finds
  its id already recorded and adds nothing (no double counting).
* ``WriteBehind`` is the asyncio side: a task that freezes and applies a batch every
  ``flush_interval`` seconds, retries with backoff while Postgres is unreachable, and runs a
  final flush at shutdown.

Only one batch is in flight per replica: while it is being retried, new increments gather in
the fresh dict, and the frozen batch is retried unchanged (same ``seq``) until its outcome is
known. Replicas never conflict because every UPSERT is additive and Postgres applies the keys
in one order (``ORDER BY key COLLATE "C"``), so concurrent batches lock rows in the same order
and cannot deadlock.

The event loop does as little of a flush as it can: freezing is two list copies (the sort is
Postgres's), and the keys and deltas travel as two strings rather than two arrays of 100,000
elements each (asyncpg encodes those element by element on the loop: 0.2 s at 100k keys, now
about 0.03 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg

from .db import Connection
from .errors import ServiceUnavailable
from .metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: The first retry waits this long, then twice as long each time, up to one flush interval: a
#: recovered Postgres is caught up within one interval of coming back.
_FIRST_BACKOFF_SECONDS = 0.1
#: ``applied_batches`` only has to remember a batch for as long as a retry of it could come.
_PRUNE_EVERY_SECONDS = 3600.0
_OBSERVE_EVERY_SECONDS = 0.5


class BackpressureError(ServiceUnavailable):
    """The replica holds ``max_pending_keys`` distinct keys and cannot take a new one."""

    slug = "backpressure"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "too many keys are waiting to be persisted; retry later",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


#: Joins the keys of a batch into one string. Keys never hold control characters (validation),
#: so this one cannot be part of a key.
KEY_SEPARATOR = "\x1f"


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    replica_id: str
    seq: int
    keys: list[str]  # in no particular order: the statement sorts them
    deltas: list[int]
    oldest: float  # monotonic time of the batch's oldest delta
    # Keys whose delta summed over the interval does not fit a bigint (thousands of huge
    # increments to one key): sent as numeric, applied if the stored total still fits.
    wide: dict[str, int] = dataclasses.field(default_factory=dict)


class Aggregator:
    """Per-process sums of unpersisted increments. No I/O; not thread-safe (one event loop)."""

    def __init__(
        self,
        replica_id: str,
        max_pending_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica_id = replica_id
        self.max_pending_keys = max_pending_keys
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._pending_since: float | None = None
        self._seq = 0
        self.in_flight: Batch | None = None

    def add(self, key: str, value: int) -> None:
        pending = self._pending
        if key in pending:
            pending[key] += value
            return
        if len(pending) >= self.max_pending_keys:
            raise BackpressureError(retry_after=1)
        if not pending:
            self._pending_since = self._clock()
        pending[key] = value

    def freeze(self) -> Batch | None:
        """The batch to apply next: the one in flight if any, else the swapped-out pending dict."""
        if self.in_flight is not None:
            return self.in_flight
        if not self._pending:
            return None
        # The swap is atomic with respect to the handlers: there is no await between the
        # two assignments, and handlers only ever see one dict or the other.
        pending, since = self._pending, self._pending_since
        self._pending, self._pending_since = {}, None
        keys, deltas = list(pending), list(pending.values())
        wide: dict[str, int] = {}
        # min and max run in C: the per-key test below only when some sum left bigint.
        if deltas and (min(deltas) < INT64_MIN or max(deltas) > INT64_MAX):
            wide = {k: d for k, d in pending.items() if not INT64_MIN <= d <= INT64_MAX}
            keys = [k for k in keys if k not in wide]
            deltas = [pending[k] for k in keys]
        self._seq += 1
        assert since is not None  # a non-empty dict always has a start time
        self.in_flight = Batch(self.replica_id, self._seq, keys, deltas, since, wide)
        return self.in_flight

    def settle(self, batch: Batch) -> None:
        """The batch's outcome is known (applied, or found already applied): forget it."""
        if self.in_flight is batch:
            self.in_flight = None

    @property
    def pending_keys(self) -> int:
        in_flight = self.in_flight
        return len(self._pending) + (len(in_flight.keys) + len(in_flight.wide) if in_flight else 0)

    @property
    def is_empty(self) -> bool:
        return not self._pending and self.in_flight is None

    @property
    def is_full(self) -> bool:
        return len(self._pending) >= self.max_pending_keys

    def persist_lag(self) -> float:
        """Age in seconds of the oldest delta not yet persisted (0 when there is none)."""
        oldest = self.in_flight.oldest if self.in_flight else self._pending_since
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def snapshot(self) -> dict[str, int]:
        """Everything not yet persisted, per key (for tests and shutdown accounting)."""
        totals = dict(self._pending)
        if self.in_flight is not None:
            batch = zip(self.in_flight.keys, self.in_flight.deltas, strict=True)
            for key, delta in [*batch, *self.in_flight.wide.items()]:
                totals[key] = totals.get(key, 0) + delta
        return totals


# One statement, one implicit transaction: the batch id is recorded and the deltas are added
# together or not at all. If the id is already recorded (a retry after an ambiguous commit),
# `fresh` is empty, so `delta` and `wide` are empty and nothing is added. A key whose new total
# would leave bigint is not updated (the WHERE of DO UPDATE) and is reported back as rejected;
# every other key of the batch is still applied. `wide` holds the rare deltas that do not fit a
# bigint themselves ($5/$6, almost always empty): they can only update an existing row whose
# total then still fits, since a new row would hold the delta itself.
APPLY_BATCH_SQL = """
WITH fresh AS (
    INSERT INTO applied_batches (replica_id, seq, applied_at)
    VALUES ($1, $2, now())
    ON CONFLICT DO NOTHING
    RETURNING 1
), delta AS (
    SELECT d.key, d.delta
    FROM unnest(
        string_to_array($3::text, E'\\x1f'), string_to_array($4::text, ',')::bigint[]
    ) AS d (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), upserted AS (
    INSERT INTO counters AS c (key, value, updated_at)
    -- One order for every replica (byte order: no collation to look up), so concurrent
    -- batches lock shared rows in the same order and cannot deadlock.
    SELECT key, delta, now() FROM delta ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE
        SET value = c.value + excluded.value, updated_at = excluded.updated_at
        -- The sum stays inside bigint, tested without computing it (which would overflow).
        WHERE CASE WHEN excluded.value >= 0
                   THEN c.value <= 9223372036854775807 - excluded.value
                   ELSE c.value >= -9223372036854775808 - excluded.value END
    RETURNING c.key
), wide AS (
    SELECT w.key, w.delta
    FROM unnest($5::text[], $6::numeric[]) AS w (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), widened AS (
    UPDATE counters AS c
    SET value = (c.value + w.delta)::bigint, updated_at = now()
    FROM wide AS w
    WHERE c.key = w.key
      AND c.value + w.delta BETWEEN -9223372036854775808 AND 9223372036854775807
    RETURNING c.key
)
SELECT
    EXISTS (SELECT FROM fresh) AS fresh,
    -- Which keys were rejected is only worked out when some were: the counts are cheap, the
    -- anti-join over a large batch is not, and a CASE runs its subquery only when needed.
    CASE WHEN (SELECT count(*) FROM upserted) + (SELECT count(*) FROM widened)
              < (SELECT count(*) FROM delta) + (SELECT count(*) FROM wide)
         THEN ARRAY (
             (SELECT key FROM delta EXCEPT ALL SELECT key FROM upserted)
             UNION ALL
             (SELECT key FROM wide EXCEPT ALL SELECT key FROM widened))
         ELSE '{}'::text[] END AS rejected
"""

PRUNE_SQL = "DELETE FROM applied_batches WHERE applied_at < now() - interval '1 day'"


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    fresh: bool  # False: this batch id had already been applied by an earlier attempt
    rejected: list[str]  # keys whose total would have left the bigint range


async def apply_batch(conn: Connection, batch: Batch, statement_timeout: float) -> Applied:
    row = await conn.fetchrow(
        APPLY_BATCH_SQL,
        batch.replica_id,
        batch.seq,
        KEY_SEPARATOR.join(batch.keys),
        ",".join(map(str, batch.deltas)),
        list(batch.wide),
        list(batch.wide.values()),
        timeout=statement_timeout,
    )
    assert row is not None  # the outer SELECT always returns exactly one row
    return Applied(fresh=row["fresh"], rejected=list(row["rejected"]))


class WriteBehind:
    """Runs the flush loop of one replica (one worker process)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        replica_id: str,
        flush_interval: float,
        max_pending_keys: int,
        tracer: Tracer | None = None,
    ) -> None:
        # A fresh suffix per process start: seq restarts at 1, and a batch id must never
        # collide with one recorded by an earlier incarnation of the same replica.
        incarnation = f"{replica_id}:{secrets.token_hex(6)}"
        self.aggregator = Aggregator(incarnation, max_pending_keys)
        self.pool = pool
        self.metrics = metrics
        self.flush_interval = flush_interval
        self.tracer = tracer
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        # A deadline, not "time since the last prune": the monotonic clock starts near zero
        # after boot, so no value of it can stand for "long ago".
        self._next_prune = time.monotonic() + _PRUNE_EVERY_SECONDS
        self.last_error: str | None = None

    @property
    def replica_id(self) -> str:
        return self.aggregator.replica_id

    def add(self, key: str, value: int) -> None:
        try:
            self.aggregator.add(key, value)
        except BackpressureError:
            self.metrics.backpressure_rejections.inc()
            raise

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="write-behind flusher"),
            asyncio.create_task(self._observe_often(), name="write-behind gauges"),
        ]

    async def _run(self) -> None:
        delay = self.flush_interval
        while True:
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                ok = await self.flush()
            except Exception:  # pragma: no cover -- flush() handles I/O errors; this is for bugs
                # The loop must go on whatever happens, or nothing is ever persisted again.
                log.exception("flush loop error", extra={"event": "flush", "outcome": "bug"})
                ok = False
            if ok:
                delay = max(0.0, self.flush_interval - (time.monotonic() - started))
                await self._maybe_prune()
            else:
                delay = min(self.flush_interval, _FIRST_BACKOFF_SECONDS * 2**self._failures)

    async def _observe_often(self) -> None:
        # The gauges must move while a flush hangs (Postgres unresponsive), not only per flush.
        while True:
            self.observe()
            await asyncio.sleep(_OBSERVE_EVERY_SECONDS)

    async def flush(self) -> bool:
        """Freeze and apply one batch. True when nothing is left in flight."""
        batch = self.aggregator.freeze()
        self.observe()
        if batch is None:
            return True
        started = time.perf_counter()
        span = (
            self.tracer.start_as_current_span(
                "increment.flush",
                attributes={"increment.seq": batch.seq, "increment.keys": len(batch.keys)},
            )
            if self.tracer is not None
            else contextlib.nullcontext()
        )
        try:
            # An interval for the pool to hand out (or open) a connection; past the statement
            # timeout the outcome is unknown, and the retry of the same batch id settles it.
            with span:
                async with self.pool.acquire(timeout=self.flush_interval) as conn:
                    applied = await apply_batch(
                        conn, batch, statement_timeout=max(5.0, self.flush_interval)
                    )
        except Exception as exc:  # noqa: BLE001 -- the flusher must survive any failure
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.flush_failures.inc()
            log.warning(
                "flush failed, will retry",
                extra={
                    "event": "flush",
                    "outcome": "error",
                    "replica_id": batch.replica_id,
                    "seq": batch.seq,
                    "keys": len(batch.keys),
                    "error": self.last_error,
                    "attempt": self._failures,
                },
            )
            return False
        duration = time.perf_counter() - started
        self._failures = 0
        self.last_error = None
        self.aggregator.settle(batch)
        self.metrics.flush_duration.observe(duration)
        self.metrics.flush_keys.observe(len(batch.keys))
        if applied.rejected:
            self._reject(batch, applied.rejected)
        log.info(
            "flush applied",
            extra={
                "event": "flush",
                "outcome": "applied" if applied.fresh else "already-applied",
                "replica_id": batch.replica_id,
                "seq": batch.seq,
                "keys": len(batch.keys),
                "duration": round(duration, 6),
            },
        )
        self.observe()
        return self.aggregator.in_flight is None

    def _reject(self, batch: Batch, keys: Sequence[str]) -> None:
        self.metrics.overflow_rejected.inc(len(keys))
        log.error(
            "deltas rejected: the counter would leave the bigint range",
            extra={
                "event": "overflow",
                "replica_id": batch.replica_id,
                "seq": batch.seq,
                "rejected_keys": list(keys[:20]),
                "rejected": len(keys),
            },
        )

    async def _maybe_prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + _PRUNE_EVERY_SECONDS
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn:
                await conn.execute(PRUNE_SQL, timeout=30)
        except Exception:
            log.warning("pruning applied_batches failed", exc_info=True)

    def observe(self) -> None:
        self.metrics.pending_keys.set(self.aggregator.pending_keys)
        self.metrics.persist_lag.set(self.aggregator.persist_lag())

    async def close(self, within: float) -> None:
        """Stop the loop, then flush everything left, retrying for at most ``within`` seconds."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        deadline = time.monotonic() + within
        while not self.aggregator.is_empty:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    if await self.flush():
                        continue
            except TimeoutError:
                break
            await asyncio.sleep(min(remaining, _FIRST_BACKOFF_SECONDS * 2**self._failures, 1.0))
        left = self.aggregator.snapshot()
        if left:
            log.error(
                "shutdown: increments could not be persisted and are lost",
                extra={"event": "shutdown", "keys": len(left), "sum": sum(left.values())},
            )
        else:
            log.info("shutdown: everything acknowledged is persisted", extra={"event": "shutdown"})
