"""The accept policy: what the write-behind does with an increment request, and what the
answer may say. One call (``AcceptPolicy.accept``) decides; the views only map its outcome to
HTTP, and its refusals are domain errors (errors.py) that the middleware answers.

- No ``Idempotency-Key``, no ``Prefer: durable``: summed into the aggregator; written behind.
- With a key: the request travels whole, and only the first request with that key (in its
  scope) counts, on whichever replica commits it first. A replay (same key, same body) is told
  what the first was told (a durable retry, what was committed); another body under a key
  whose owner is known (committed, or settled here) is refused (422) and never applied; while
  the owner is undecided, 409 with Retry-After.
- ``Prefer: durable``: the request waits for the commit of its group (durable.py); the answer
  says what was committed, and which items were not applied.

A key's scope is its owner's: a signed-in user's keys are their own; the open routes share one
scope. The fingerprint binds a key to one body: the route kind and the items, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence

import asyncpg
import orjson

from .. import db
from ..errors import (
    IdempotencyKeyReused,
    KeyInUse,
    NotCommitted,
    OutcomeUnknown,
)
from ..metrics import Metrics
from .aggregator import Aggregator
from .durable import Durable, DurableAnswer, GroupCommitter
from .flusher import Flusher
from .items import Item, Keyed, Recorded, Totals, Unkeyed
from .records import lookup_records

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


#: The one scope of the open routes' idempotency keys (a session's user has a scope of its own).
OPEN_SCOPE = "open"
#: Why an item of a committed request was not applied.
OVERFLOW = "the counter would leave the 64-bit range"


def scope_of(user_id: str | None) -> str:
    """Whose idempotency keys a request's key is among."""
    return OPEN_SCOPE if user_id is None else f"user:{user_id}"


def fingerprint(kind: str, items: Sequence[Item]) -> bytes:
    """What a keyed request must repeat to be the same request: the route kind (a single
    increment or a batch) and the parsed items, in order (not the headers, not the bytes).
    Stored with the key: changing it would make every stored key another body's."""
    return hashlib.blake2b(orjson.dumps([kind, items]), digest_size=16).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class NotApplied:
    index: int  # the item's position in the request
    key: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """How an accepted request stands: written behind (in memory, persisted within the flush
    interval), or committed to Postgres, with the items that were not applied, if any."""

    committed: bool
    not_applied: tuple[NotApplied, ...] = ()
    #: return=representation was asked and is answered (its first answer carried totals).
    totals: Totals | None = None


WRITTEN_BEHIND = Accepted(committed=False)
COMMITTED = Accepted(committed=True)


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this Idempotency-Key was used for another request; nothing was applied"
    )


def _in_use(retry_after: int) -> KeyInUse:
    return KeyInUse(
        "another request with this Idempotency-Key is not settled yet; retry after it is",
        headers={"Retry-After": str(retry_after)},
    )


def _unknown() -> OutcomeUnknown:
    return OutcomeUnknown(
        "no commit in time: the increments may have been applied, or may still be (the"
        " replica keeps trying); a retry with the same Idempotency-Key is safe, one"
        " without may count them twice",
        headers={"Retry-After": "1"},
    )


class AcceptPolicy:
    def __init__(
        self,
        aggregator: Aggregator,
        committer: GroupCommitter,
        flusher: Flusher,
        metrics: Metrics,
        *,
        pool: asyncpg.Pool,
        idempotency_ttl: float,
        durable_timeout: float,
    ) -> None:
        self.aggregator = aggregator
        self.committer = committer
        self.flusher = flusher
        self.metrics = metrics
        self.pool = pool
        self.idempotency_ttl = idempotency_ttl
        self.durable_timeout = durable_timeout

    async def accept(
        self,
        items: Sequence[Item],
        *,
        kind: str,
        idempotency_key: str | None,
        user_id: str | None,
        durable: bool,
        representation: bool = False,
    ) -> Accepted:
        """Accept ``items`` (one increment or a batch, ``kind``), or raise the refusal.
        ``representation`` (return=representation) counts only with ``durable``."""
        representation = representation and durable
        if idempotency_key is None:
            if durable:
                unkeyed = Unkeyed(tuple(items), representation)
                return self._told(await self.committer.commit(unkeyed), items, representation)
            self.aggregator.add_many(items)
            self.metrics.increments.inc(len(items))
            return WRITTEN_BEHIND
        keyed = Keyed(
            scope_of(user_id),
            idempotency_key,
            fingerprint(kind, items),
            tuple(items),
            durable,
            representation,
        )
        if self.committer.waiting(keyed.ident):
            raise _in_use(1)  # a durable request with this key waits for its commit here
        record = self.aggregator.recorded(keyed.ident)
        if record is None:
            pending = self.aggregator.pending(keyed.ident)
            if pending is not None and pending.fingerprint == keyed.fingerprint:
                return await self._same_as_pending(keyed)
            if pending is not None:
                record = await self._owner(keyed, pending)
        if record is not None:
            return self._replay(keyed, record)
        if durable:
            return self._told(await self.committer.commit(keyed), items, representation)
        self.aggregator.add_keyed(keyed)
        self.metrics.increments.inc(len(items))
        return WRITTEN_BEHIND

    def _replay(self, keyed: Keyed, record: Recorded) -> Accepted:
        """Tell a request with a known owner what the owner was told, or 422."""
        if record.fingerprint != keyed.fingerprint:
            self.metrics.idempotency_conflicts.labels("request").inc()
            raise _reused()
        self.metrics.idempotent_replays.labels("request").inc()
        if keyed.durable or record.durable:
            totals = record.totals if keyed.representation else None
            return _committed(record.not_applied, keyed.items, totals)
        return WRITTEN_BEHIND

    async def _same_as_pending(self, keyed: Keyed) -> Accepted:
        """A retry of the request this replica holds, not yet settled."""
        if not keyed.durable:
            self.metrics.idempotent_replays.labels("request").inc()
            return WRITTEN_BEHIND  # the first got 202, and so does its retry
        pending = self.aggregator.take_pending(keyed.ident)
        if pending is not None:
            # Still waiting for the timer: it moves into the durable group, its record saying
            # that its first answer was a 202.
            # (Its first answer was a 202, without totals: so is this one.)
            return self._told(await self.committer.commit(pending), keyed.items, False)
        # In flight: the timer's batch decides; its outcome, once settled, is the answer.
        await self.flusher.until_settled(self.durable_timeout)
        record = self.aggregator.recorded(keyed.ident)
        if record is None:
            raise _unknown()
        return self._replay(keyed, record)

    async def _owner(self, keyed: Keyed, pending: Keyed) -> Recorded:
        """This replica holds another body under the key, unsettled: Postgres says whether an
        owner is committed. None committed: 409 until this replica's next flush decides."""
        async with db.connection(self.pool, "idempotency key store") as conn:
            found = await lookup_records(
                conn, [keyed.ident], self.idempotency_ttl, db.REQUEST_TIMEOUT_SECONDS
            )
        if keyed.ident not in found:
            raise _in_use(max(1, math.ceil(self.flusher.next_flush_in())))
        record, age = found[keyed.ident]
        self.aggregator.remember(keyed.ident, record, age)
        if record.fingerprint != pending.fingerprint and self.aggregator.take_pending(keyed.ident):
            # The body held here lost the key: dropped now, as its flush would.
            self.metrics.idempotency_conflicts.labels("request").inc()
            log.warning(
                "keyed request dropped: its Idempotency-Key was used for another body",
                extra={"event": "idempotency-conflict", "keys": [keyed.key[:64]]},
            )
        return record

    def _told(self, answer: DurableAnswer, items: Sequence[Item], representation: bool) -> Accepted:
        """What a durable request is answered, from its group's outcome (its totals, or a
        replay's recorded ones, if it asked for them)."""
        if answer.outcome is Durable.NOT_SENT:
            raise NotCommitted(
                "the increments could not be committed in time; nothing was applied",
                headers={"Retry-After": "1"},
            )
        if answer.outcome is Durable.UNKNOWN:
            raise _unknown()
        if answer.outcome is Durable.CONFLICT:
            raise _reused()
        if answer.outcome is Durable.COMMITTED:
            self.metrics.increments.inc(len(items) - len(answer.not_applied))
        return _committed(answer.not_applied, items, answer.totals if representation else None)


def _committed(
    not_applied: Sequence[int], items: Sequence[Item], totals: Totals | None = None
) -> Accepted:
    if not not_applied and totals is None:
        return COMMITTED
    return Accepted(
        committed=True,
        not_applied=tuple(NotApplied(n, items[n][0], OVERFLOW) for n in not_applied),
        totals=totals,
    )
