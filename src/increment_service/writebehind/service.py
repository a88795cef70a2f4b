"""``WriteBehind``: one replica's write-behind (one worker process), composed of the
aggregator (in memory), the flusher (the timer's batches), the group committer (durable
requests) and the accept policy that decides between them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import asyncpg

from ..metrics import Metrics
from .accept import Accepted, AcceptPolicy
from .aggregator import Aggregator
from .clock import PostgresClock
from .durable import GroupCommitter
from .flusher import Flusher
from .items import Batch, Ident, Item

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger("increment_service.writebehind")  # one logger for the package

#: The shutdown log names at most this many counter keys (with their sums) per line.
LOGGED_KEYS = 100


class WriteBehind:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        replica_id: str,
        flush_interval: float,
        max_pending_keys: int,
        idempotency_ttl: float = 3600.0,
        durable_timeout: float = 5.0,
        tracer: Tracer | None = None,
    ) -> None:
        # A fresh suffix per process start: seq restarts at 1, and a batch id must never
        # collide with one recorded by an earlier incarnation of the same replica.
        incarnation = f"{replica_id}:{secrets.token_hex(6)}"
        self.pool = pool
        self.metrics = metrics
        self.aggregator = Aggregator(
            incarnation,
            max_pending_keys,
            idempotency_ttl=idempotency_ttl,
            on_refusal=metrics.backpressure_rejections.inc,
        )
        clock = PostgresClock()  # one view of Postgres's clock for both loops
        self.flusher = Flusher(
            pool,
            metrics,
            self.aggregator,
            flush_interval=flush_interval,
            idempotency_ttl=idempotency_ttl,
            tracer=tracer,
            postgres_clock=clock,
        )
        # Durable groups have sequence numbers of their own, under an id of their own in the
        # same ledger: they commit beside the timer's batch, never as part of it.
        self.committer = GroupCommitter(
            pool,
            metrics,
            self.aggregator,
            durable_id=f"{incarnation}/durable",
            durable_timeout=durable_timeout,
            idempotency_ttl=idempotency_ttl,
            postgres_clock=clock,
        )
        self._policy = AcceptPolicy(
            self.aggregator,
            self.committer,
            self.flusher,
            metrics,
            pool=pool,
            idempotency_ttl=idempotency_ttl,
            durable_timeout=durable_timeout,
        )

    @property
    def replica_id(self) -> str:
        return self.aggregator.replica_id

    def add(self, key: str, value: int) -> None:
        """The default path (no key, no preference): summed in memory, no I/O."""
        self.aggregator.add(key, value)
        self.metrics.increments.inc()

    async def accept(
        self,
        items: Sequence[Item],
        *,
        kind: str,
        idempotency_key: str | None = None,
        user_id: str | None = None,
        durable: bool = False,
        representation: bool = False,
    ) -> Accepted:
        """Any other request: see accept.py for what is decided, and how."""
        return await self._policy.accept(
            items,
            kind=kind,
            idempotency_key=idempotency_key,
            user_id=user_id,
            durable=durable,
            representation=representation,
        )

    @property
    def is_full(self) -> bool:
        """MAX_PENDING_KEYS reached: new keys are refused until a flush."""
        return self.aggregator.is_full

    @property
    def committing(self) -> bool:
        return self.committer.committing

    def waiting_durably(self, ident: Ident) -> bool:
        return self.committer.waiting(ident)

    async def flush(self) -> bool:
        """Freeze and apply one batch now (the timer does this every interval)."""
        return await self.flusher.flush()

    def start(self, offset: float = 0.0) -> None:
        self.flusher.start(offset)
        self.committer.start()

    def shut(self, answer_within: float) -> None:
        """Shutdown began (requests drain): durable requests waiting for a group never sent
        are answered ``503 not-committed`` now, and no group is sent any more; those whose
        group is out get their answer within ``answer_within`` seconds (GroupCommitter.shut)."""
        self.committer.shut(answer_within)

    async def close(self, within: float) -> None:
        """Everything left, in ``within`` seconds in all: one deadline, fixed now.

        The durable group still out (retried under its id for its outcome) and the final
        flush (the timer's batch in flight, then everything pending) go on side by side until
        the deadline. A statement Postgres has still not answered then is cut off: the pool's
        connections are terminated (requests have drained: nothing else uses it), since
        cancelling it would make asyncpg send a cancel request through the same hung server.
        Then the loops stop, and the log says what became of every increment left:
        ``outcome=unknown`` for a batch sent and not answered (the ledger knows, under its
        id), ``outcome=lost`` for what was never sent."""
        deadline = time.monotonic() + within
        self.committer.shut(answer_within=0.0)  # the app did it as the drain began
        await asyncio.gather(self.committer.settle(deadline), self.flusher.final_flush(deadline))
        if self.committer.outstanding or self.flusher.flushing:
            log.warning(
                "Postgres has not answered by the shutdown deadline: its connections are cut",
                extra={"event": "postgres", "outcome": "cut"},
            )
            self.pool.terminate()
        await self.committer.stop()
        await self.flusher.stop()
        self._report()

    def _report(self) -> None:
        reported = False
        batch = self.flusher.unanswered()
        if batch is not None:
            _left("unknown", _sums(batch), batch=batch.replica_id, seq=batch.seq)
            reported = True
        group = self.committer.unanswered()
        if group is not None:
            seq, sums = group
            _left("unknown", sums, batch=self.committer.durable_id, seq=seq)
            reported = True
        lost = self.aggregator.snapshot(in_flight=batch is None)
        if lost:
            _left("lost", lost)
            reported = True
        if not reported:
            log.info("shutdown: everything acknowledged is persisted", extra={"event": "shutdown"})


def _sums(batch: Batch) -> dict[str, int]:
    """What ``batch`` adds, per counter key (keyed items included)."""
    sums = dict(zip(batch.keys, batch.deltas, strict=True))
    for key, delta in batch.wide.items():
        sums[key] = sums.get(key, 0) + delta
    for request in batch.keyed:
        for key, value in request.items:
            sums[key] = sums.get(key, 0) + value
    return sums


_LEFT_MESSAGES = {
    "unknown": "shutdown: sent to Postgres and not answered: these increments may or may not"
    " be persisted (the batch id is in applied_batches if they are)",
    "lost": "shutdown: never sent to Postgres: these increments are lost",
}


def _left(outcome: str, sums: Mapping[str, int], **batch: object) -> None:
    """One line for what a shutdown leaves unpersisted: how many keys and how much, and the
    first LOGGED_KEYS keys with their sums."""
    shown = dict(list(sums.items())[:LOGGED_KEYS])
    log.error(
        _LEFT_MESSAGES[outcome],
        extra={
            "event": "shutdown",
            "outcome": outcome,
            **batch,
            "keys": len(sums),
            "sum": sum(sums.values()),
            "counters": shown,
        },
    )
