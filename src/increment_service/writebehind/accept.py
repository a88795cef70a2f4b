"""The accept policy: what the write-behind does with an increment request, and what the
answer may say. One call (``AcceptPolicy.accept``) decides; the views only map its outcome to
HTTP, and its refusals are domain errors (errors.py) that the middleware answers.

- No ``Idempotency-Key``, no ``Prefer: durable``: summed into the aggregator; written behind.
- With a key: the request travels whole, and only the first request with that key (in its
  scope) counts, on whichever replica commits it first. A replay (same key, same body) gets the
  answer the first got; another body under a used key is refused (422) and never applied.
- ``Prefer: durable``: the request waits for the commit of its group (durable.py); the answer
  says what was committed, and which items were not applied.

A key's scope is its owner's: a signed-in user's keys are their own; the open routes share one
scope. The fingerprint binds a key to one body: the route kind and the items, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import orjson

from ..errors import BackpressureError, IdempotencyKeyReused, KeyInUse, NotCommitted, OutcomeUnknown
from ..metrics import Metrics
from .aggregator import Aggregator, KeyedOutcome
from .durable import Durable, GroupCommitter
from .items import Item, Keyed

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


WRITTEN_BEHIND = Accepted(committed=False)
COMMITTED = Accepted(committed=True)


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this Idempotency-Key was used for another request; nothing was applied"
    )


def _in_use() -> KeyInUse:
    return KeyInUse(
        "a durable request with this key still waits for its commit",
        headers={"Retry-After": "1"},
    )


class AcceptPolicy:
    def __init__(self, aggregator: Aggregator, committer: GroupCommitter, metrics: Metrics) -> None:
        self.aggregator = aggregator
        self.committer = committer
        self.metrics = metrics

    async def accept(
        self,
        items: Sequence[Item],
        *,
        kind: str,
        idempotency_key: str | None,
        user_id: str | None,
        durable: bool,
    ) -> Accepted:
        """Accept ``items`` (one increment or a batch, ``kind``), or raise the refusal."""
        keyed = None
        if idempotency_key is not None:
            keyed = Keyed(
                scope_of(user_id), idempotency_key, fingerprint(kind, items), tuple(items)
            )
        if durable:
            return await self._commit(items, keyed)
        if keyed is None:
            try:
                self.aggregator.add_many(items)
            except BackpressureError:
                self.metrics.backpressure_rejections.inc()
                raise
            self.metrics.increments.inc(len(items))
            return WRITTEN_BEHIND
        return self._write_behind_keyed(keyed)

    def _write_behind_keyed(self, keyed: Keyed) -> Accepted:
        if self.committer.waiting(keyed.ident):
            raise _in_use()
        try:
            outcome = self.aggregator.add_keyed(keyed)
        except BackpressureError:
            self.metrics.backpressure_rejections.inc()
            raise
        if outcome is KeyedOutcome.CONFLICT:
            self.metrics.idempotency_conflicts.labels("request").inc()
            raise _reused()
        if outcome is KeyedOutcome.REPLAY:
            self.metrics.idempotent_replays.labels("request").inc()
        else:
            self.metrics.increments.inc(len(keyed.items))
        return WRITTEN_BEHIND  # a replay gets the answer the first one got

    async def _commit(self, items: Sequence[Item], keyed: Keyed | None) -> Accepted:
        if keyed is not None:
            if self.committer.waiting(keyed.ident):
                raise _in_use()
            known = self.aggregator.lookup(keyed.ident)
            if known is not None:
                recorded, applied = known
                if recorded != keyed.fingerprint:
                    raise _reused()
                # The first request with this key is committed (a durable answer is true), or
                # is written behind (it got a 202: so does its retry).
                return COMMITTED if applied else WRITTEN_BEHIND
        answer = await self.committer.commit(items, keyed)
        if answer.outcome is Durable.NOT_SENT:
            raise NotCommitted(
                "the increments could not be committed in time; nothing was applied",
                headers={"Retry-After": "1"},
            )
        if answer.outcome is Durable.UNKNOWN:
            raise OutcomeUnknown(
                "no commit in time: the increments may have been applied, or may still be (the"
                " replica keeps trying); a retry with the same Idempotency-Key is safe, one"
                " without may count them twice",
                headers={"Retry-After": "1"},
            )
        if answer.outcome is Durable.CONFLICT:
            raise _reused()
        if answer.outcome is Durable.COMMITTED:
            self.metrics.increments.inc(sum(1 for key, _ in items if key not in answer.rejected))
        if answer.rejected:
            # Some items were not applied: never a plain 204. Which ones, by their index.
            return Accepted(
                committed=True,
                not_applied=tuple(
                    NotApplied(n, key, OVERFLOW)
                    for n, (key, _) in enumerate(items)
                    if key in answer.rejected
                ),
            )
        return COMMITTED
