"""The timer's side of the write-behind: every ``flush_interval`` seconds, freeze the
aggregator's batch and apply it; retry with backoff while Postgres is unreachable (the same
batch, same id, until its outcome is known); prune old batch ids hourly and empty the
idempotency partition whose time has passed; keep the gauges moving; and flush what is left at
shutdown, until a deadline, without ever cancelling a statement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from ..metrics import Metrics
from .aggregator import Aggregator
from .backoff import Backoff
from .backoff import cancelling as _cancelling
from .clock import PostgresClock
from .items import Batch
from .settle import record_rejections, settle_keyed
from .store import apply_batch
from .upkeep import empty_next_partition, prune

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
        postgres_clock: PostgresClock | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.aggregator = aggregator
        self.flush_interval = flush_interval
        self.idempotency_ttl = idempotency_ttl
        # Postgres's clock as last seen, shared by the write-behind's statements (store.py).
        self.postgres_clock = postgres_clock or PostgresClock()
        self.tracer = tracer
        # Up to one interval: a recovered Postgres is caught up within one interval.
        self.backoff = Backoff(cap=flush_interval)
        self.last_error: str | None = None
        self._loop: asyncio.Task[None] | None = None  # the timer's loop
        self._gauges: asyncio.Task[None] | None = None
        self._final: asyncio.Task[bool] | None = None  # the final flush's attempt in progress
        self._stopping = asyncio.Event()
        # The batch in flight once a statement carrying it went to Postgres: from then on its
        # outcome is unknown until a flush settles it (the shutdown log says so).
        self._sent: Batch | None = None
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
        self._loop = asyncio.create_task(
            self._run(self.flush_interval + offset), name="write-behind flusher"
        )
        self._gauges = asyncio.create_task(self._observe_often(), name="write-behind gauges")

    @property
    def flushing(self) -> bool:
        """A flush (or other statement of the flusher) is out, at shutdown: the timer's, or
        an attempt of the final flush."""
        return any(t is not None and not t.done() for t in (self._loop, self._final))

    async def stop(self) -> None:
        """Stop the loops, after final_flush (and after close cut the connections of a
        statement still out at the deadline): what still runs is cancelled, and how each
        task ended is retrieved (a task left with an exception nobody retrieved is an ERROR
        with a traceback in the log)."""
        self._stopping.set()
        tasks = [t for t in (self._loop, self._gauges, self._final) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None:  # pragma: no cover -- flush() handles I/O errors: a bug
                log.error(
                    "flusher task failed",
                    extra={"event": "flush", "outcome": "bug", "error": _describe(error)},
                )

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if shutdown stops the loop meanwhile: True if it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

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
        # Shutdown stops the loop between statements, never in one: a task cancelled while
        # asyncpg waits for Postgres makes it send a cancel request over a new connection,
        # which hangs with a hung Postgres (and then fails in a task of asyncpg's own).
        while True:
            self._next_flush_at = time.monotonic() + delay
            if await self._pause(delay):
                break
            started = time.monotonic()
            try:
                ok = await self.flush()
            except Exception:  # pragma: no cover -- flush() handles I/O errors; this is for bugs
                # The loop must go on whatever happens, or nothing is ever persisted again.
                log.exception("flush loop error", extra={"event": "flush", "outcome": "bug"})
                ok = False
            if self._stopping.is_set():
                return
            if ok:
                delay = max(0.0, self.flush_interval - (time.monotonic() - started))
                await self.maybe_prune()
                if not self._stopping.is_set():
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
                    self._sent = batch  # from here on, its outcome may be unknown
                    applied = await apply_batch(
                        conn,
                        batch,
                        statement_timeout=max(5.0, self.flush_interval),
                        idempotency_ttl=self.idempotency_ttl,
                        clock=self.postgres_clock,
                    )
        except Exception as exc:
            if _cancelling():
                # Shutdown cancelled it: this error is the closed connection's; the cancel is
                # what happened.
                raise asyncio.CancelledError from exc
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

    async def final_flush(self, deadline: float) -> None:
        """Stop the timer and flush everything left, retrying until ``deadline`` (a time of
        the monotonic clock), after the timer's flush in progress if there is one.

        A statement is never cancelled: one still unanswered at the deadline is left out, for
        WriteBehind.close to cut its connection (``flushing`` says so)."""
        self._stopping.set()
        if self._loop is not None and not await _ended(self._loop, deadline):
            return
        while not self.aggregator.is_empty:
            self._final = asyncio.ensure_future(self.flush())
            if not await _ended(self._final, deadline):
                return
            error = self._final.exception()
            if error is None and self._final.result():
                continue
            if error is not None:  # pragma: no cover -- flush() handles I/O errors: a bug
                log.error(
                    "final flush error",
                    extra={"event": "flush", "outcome": "bug", "error": _describe(error)},
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self.backoff.delay(cap=_FINAL_MAX_BACKOFF_SECONDS)))

    def unanswered(self) -> Batch | None:
        """The batch in flight if a statement carrying it went to Postgres and no answer
        settled it: its outcome is unknown (the ledger says, under its id)."""
        batch = self.aggregator.in_flight
        return batch if batch is not None and batch is self._sent else None

    async def _expire_idempotency_keys(self) -> None:
        """At most every TTL/8 (and every minute), empty the partition the next bucket will
        use (upkeep.empty_next_partition)."""
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + min(60.0, self.idempotency_ttl / 8)
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn:
                self._emptied = await empty_next_partition(
                    conn, self.idempotency_ttl, self._emptied
                )
        except Exception as exc:  # noqa: BLE001 -- an outage: the next flush retries it
            log.warning(
                "emptying an idempotency partition failed",
                extra={"event": "expire-keys", "outcome": "error", "error": _describe(exc)},
            )

    async def maybe_prune(self) -> None:
        if time.monotonic() < self.next_prune:
            return
        self.next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn:
                await prune(conn)
        except Exception as exc:  # noqa: BLE001 -- an outage: retried at the next prune
            log.warning(
                "pruning applied_batches failed",
                extra={"event": "prune", "outcome": "error", "error": _describe(exc)},
            )

    def observe(self) -> None:
        self.metrics.pending_keys.set(self.aggregator.pending_keys)
        self.metrics.keyed_items_pending.set(self.aggregator.keyed_items_pending)
        self.metrics.persist_lag.set(self.aggregator.persist_lag())


def _describe(error: BaseException) -> str:
    """An error in one line: its type and message (an outage is no bug: no traceback)."""
    return f"{type(error).__name__}: {error}"


async def _ended(task: asyncio.Future[Any], deadline: float) -> bool:
    """Wait for ``task`` until ``deadline`` without cancelling it: whether it ended."""
    await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    return task.done()
