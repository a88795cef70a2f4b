"""The timer's side of the write-behind: every ``flush_interval`` seconds, freeze the
aggregator's batch and apply it; retry with backoff while Postgres is unreachable (the same
batch, same id, until its outcome is known); prune old batch ids hourly and empty the
idempotency partition whose time has passed; keep the gauges moving; and flush what is left at
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import asyncpg

from ..metrics import Metrics
from .aggregator import Aggregator
from .backoff import Backoff
from .settle import record_rejections, settle_keyed
from .store import apply_batch, empty_next_partition, prune

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger("increment_service.writebehind")  # one logger for the package

#: ``applied_batches`` only has to remember a batch for as long as a retry of it could come.
PRUNE_EVERY_SECONDS = 3600.0
_OBSERVE_EVERY_SECONDS = 0.5
#: The final flush's retries wait at most this long between attempts.
_FINAL_MAX_BACKOFF_SECONDS = 1.0


class Flusher:
    """Runs the flush loop of one replica (one worker process)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        aggregator: Aggregator,
        *,
        flush_interval: float,
        idempotency_ttl: float,
        tracer: Tracer | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.aggregator = aggregator
        self.flush_interval = flush_interval
        self.idempotency_ttl = idempotency_ttl
        self.tracer = tracer
        # Up to one interval: a recovered Postgres is caught up within one interval.
        self.backoff = Backoff(cap=flush_interval)
        self.last_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # A deadline, not "time since the last prune": the monotonic clock starts near zero
        # after boot, so no value of it can stand for "long ago".
        self.next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        # Which idempotency partition was last emptied, in which bucket (store.py).
        self._emptied: tuple[int, int] | None = None
        self._next_expiry = time.monotonic()
        self._next_flush_at = time.monotonic() + flush_interval
        # Set (and replaced) each time a batch in flight is settled.
        self._settled = asyncio.Event()

    def start(self, offset: float = 0.0) -> None:
        """Start the loops; the first flush comes ``offset`` seconds later than an interval
        (workers of one process stagger their flushes, see cli.run_worker)."""
        self._tasks = [
            asyncio.create_task(
                self._run(self.flush_interval + offset), name="write-behind flusher"
            ),
            asyncio.create_task(self._observe_often(), name="write-behind gauges"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def next_flush_in(self) -> float:
        """Seconds to this replica's next flush (0 if it is due or running)."""
        return max(0.0, self._next_flush_at - time.monotonic())

    async def until_settled(self, within: float) -> None:
        """Wait, at most ``within`` seconds, for the batch in flight to be settled."""
        if self.aggregator.in_flight is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), within)

    async def _run(self, delay: float) -> None:
        while True:
            self._next_flush_at = time.monotonic() + delay
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
                await self.maybe_prune()
                await self._expire_idempotency_keys()
            else:
                delay = self.backoff.delay()

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
                        conn,
                        batch,
                        statement_timeout=max(5.0, self.flush_interval),
                        idempotency_ttl=self.idempotency_ttl,
                    )
        except Exception as exc:  # noqa: BLE001 -- the flusher must survive any failure
            self.backoff.failed()
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
                    "attempt": self.backoff.failures,
                },
            )
            return False
        duration = time.perf_counter() - started
        self.backoff.succeeded()
        self.last_error = None
        self.aggregator.settle(batch)
        self._settled.set()
        self._settled = asyncio.Event()
        self.metrics.flush_duration.observe(duration)
        self.metrics.flush_keys.observe(len(batch.keys))
        record_rejections(self.metrics, batch, applied)
        if batch.requests:
            settle_keyed(self.aggregator, self.metrics, batch, applied)
        log.info(
            "flush applied",
            extra={
                "event": "flush",
                "outcome": "applied" if applied.fresh else "already-applied",
                "replica_id": batch.replica_id,
                "seq": batch.seq,
                "keys": len(batch.keys),
                "keyed": len(batch.keyed),
                "duration": round(duration, 6),
            },
        )
        self.observe()
        return self.aggregator.in_flight is None

    async def final_flush(self, within: float) -> None:
        """Flush everything left, retrying for at most ``within`` seconds (the loops are
        stopped), and say in the log what could not be persisted."""
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
            await asyncio.sleep(min(remaining, self.backoff.delay(cap=_FINAL_MAX_BACKOFF_SECONDS)))
        left = self.aggregator.snapshot()
        if left:
            log.error(
                "shutdown: increments could not be persisted and are lost",
                extra={"event": "shutdown", "keys": len(left), "sum": sum(left.values())},
            )
        else:
            log.info("shutdown: everything acknowledged is persisted", extra={"event": "shutdown"})

    async def _expire_idempotency_keys(self) -> None:
        """At most every TTL/8 (and every minute), empty the partition the next bucket will
        use (store.empty_next_partition)."""
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + min(60.0, self.idempotency_ttl / 8)
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn:
                self._emptied = await empty_next_partition(
                    conn, self.idempotency_ttl, self._emptied
                )
        except Exception:
            log.warning("emptying an idempotency partition failed", exc_info=True)

    async def maybe_prune(self) -> None:
        if time.monotonic() < self.next_prune:
            return
        self.next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn:
                await prune(conn)
        except Exception:
            log.warning("pruning applied_batches failed", exc_info=True)

    def observe(self) -> None:
        self.metrics.pending_keys.set(self.aggregator.pending_keys)
        self.metrics.keyed_items_pending.set(self.aggregator.keyed_items_pending)
        self.metrics.persist_lag.set(self.aggregator.persist_lag())
