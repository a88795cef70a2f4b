"""``WriteBehind``: one replica's write-behind (one worker process), composed of the
aggregator (in memory), the flusher (the timer's batches), the group committer (durable
requests) and the accept policy that decides between them."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from ..errors import BackpressureError
from ..metrics import Metrics
from .accept import Accepted, AcceptPolicy
from .aggregator import Aggregator
from .durable import GroupCommitter
from .flusher import Flusher
from .items import Ident, Item

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


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
        self.aggregator = Aggregator(incarnation, max_pending_keys, idempotency_ttl=idempotency_ttl)
        self.flusher = Flusher(
            pool,
            metrics,
            self.aggregator,
            flush_interval=flush_interval,
            idempotency_ttl=idempotency_ttl,
            tracer=tracer,
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
        try:
            self.aggregator.add(key, value)
        except BackpressureError:
            self.metrics.backpressure_rejections.inc()
            raise
        self.metrics.increments.inc()

    async def accept(
        self,
        items: Sequence[Item],
        *,
        kind: str,
        idempotency_key: str | None = None,
        user_id: str | None = None,
        durable: bool = False,
    ) -> Accepted:
        """Any other request: see accept.py for what is decided, and how."""
        return await self._policy.accept(
            items, kind=kind, idempotency_key=idempotency_key, user_id=user_id, durable=durable
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

    async def close(self, within: float) -> None:
        """Stop the loops, then flush everything left, retrying for at most ``within`` seconds.

        Durable requests were answered while requests drained (each within its timeout); a
        group still retried for an unknown outcome goes on for half the budget."""
        await self.committer.close(within / 2)
        await self.flusher.stop()
        await self.flusher.final_flush(within)
