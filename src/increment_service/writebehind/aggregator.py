"""The in-memory part of the write-behind, free of I/O: per-key sums of unpersisted increments
that the request handlers add to, swapped for an empty dict when a batch is frozen, and beside
them the requests that carry an Idempotency-Key (``Keyed``), which travel one by one.

Only one batch is in flight per replica: while it is being retried, new increments gather in
the fresh dict, and the frozen batch is retried unchanged (same ``seq``) until its outcome is
known (``settle``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

from ..errors import BackpressureError
from .items import Batch, Ident, Keyed, Recorded, split_wide

#: How many recently applied idempotency keys a replica remembers, to answer a retry that comes
#: back to it at once (a replay, or a 422 for another body) without asking Postgres.
KNOWN_KEYS = 100_000


class Aggregator:
    """Per-process sums of unpersisted increments, and the keyed requests beside them.

    No I/O; not thread-safe (one event loop)."""

    def __init__(
        self,
        replica_id: str,
        max_pending_keys: int,
        clock: Callable[[], float] = time.monotonic,
        idempotency_ttl: float = 3600.0,
        on_refusal: Callable[[], None] = lambda: None,
    ) -> None:
        self.replica_id = replica_id
        self.max_pending_keys = max_pending_keys
        # Called for every request refused for backpressure, whoever refuses it (a metric).
        self._on_refusal = on_refusal
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._pending_since: float | None = None
        self._keyed: dict[Ident, Keyed] = {}
        self._keyed_items = 0  # items of self._keyed, each counted against max_pending_keys
        self._seq = 0
        self.in_flight: Batch | None = None
        self._in_flight_keyed: dict[Ident, Keyed] = {}
        # Keys this replica saw applied (or found applied), with their record, until the
        # monotonic time they may be forgotten (their record time plus the TTL). Oldest first.
        self._known: collections.OrderedDict[Ident, tuple[Recorded, float]] = (
            collections.OrderedDict()
        )
        self._known_ttl = idempotency_ttl

    def refusal(self) -> BackpressureError:
        """The error that refuses a request for backpressure (MAX_PENDING_KEYS), counted."""
        self._on_refusal()
        return BackpressureError(retry_after=1)

    def add(self, key: str, value: int) -> None:
        pending = self._pending
        if key in pending:
            pending[key] += value
            return
        if len(pending) + self._keyed_items >= self.max_pending_keys:
            raise self.refusal()
        if not pending:
            self._started()
        pending[key] = value

    def add_many(self, items: Sequence[tuple[str, int]]) -> None:
        """A batch of increments, admitted whole or refused whole (nothing added)."""
        pending = self._pending
        new_keys = {key for key, _ in items if key not in pending}
        if len(pending) + self._keyed_items + len(new_keys) > self.max_pending_keys:
            raise self.refusal()
        if not pending:
            self._started()
        for key, value in items:
            pending[key] = pending.get(key, 0) + value

    def add_keyed(self, request: Keyed) -> None:
        """A keyed request goes out with the next batch (the accept policy has made sure this
        replica knows nothing of its key)."""
        if len(self._pending) + self._keyed_items + len(request.items) > self.max_pending_keys:
            raise self.refusal()
        if not self._pending and not self._keyed:
            self._started()
        self._keyed[request.ident] = request
        self._keyed_items += len(request.items)

    def _started(self) -> None:
        if self._pending_since is None:
            self._pending_since = self._clock()

    def pending(self, ident: Ident) -> Keyed | None:
        """The keyed request this replica holds for a key, not yet settled: waiting for the
        next batch, or in flight."""
        return self._keyed.get(ident) or self._in_flight_keyed.get(ident)

    def in_flight_holds(self, ident: Ident) -> bool:
        return ident in self._in_flight_keyed

    def take_pending(self, ident: Ident) -> Keyed | None:
        """Remove a keyed request that waits for the next batch (not one in flight): a durable
        retry moves it into a durable group, or it lost its key to another body."""
        request = self._keyed.pop(ident, None)
        if request is not None:
            self._keyed_items -= len(request.items)
        return request

    def recorded(self, ident: Ident) -> Recorded | None:
        """The record of a key this replica saw applied, while it remembers it."""
        known = self._known.get(ident)
        if known is None:
            return None
        if known[1] <= self._clock():
            del self._known[ident]
            return None
        return known[0]

    def remember(self, ident: Ident, record: Recorded, age: float = 0.0) -> None:
        """A key found applied (``age`` seconds ago, by Postgres's clock), for the retries that
        come back here: remembered until its record time plus the TTL. Remembering it again
        (a replay) does not extend that."""
        if ident in self._known:
            return
        self._known[ident] = (record, self._clock() + max(0.0, self._known_ttl - age))
        while len(self._known) > KNOWN_KEYS:
            self._known.popitem(last=False)

    def freeze(self) -> Batch | None:
        """The batch to apply next: the one in flight if any, else what is pending now."""
        if self.in_flight is not None:
            return self.in_flight
        if not self._pending and not self._keyed:
            return None
        # The swap is atomic with respect to the handlers: there is no await between the
        # assignments, and handlers only ever see the old containers or the new ones.
        pending, keyed, since = self._pending, self._keyed, self._pending_since
        self._pending, self._keyed, self._pending_since = {}, {}, None
        self._keyed_items = 0
        keys, deltas, wide = split_wide(pending)
        self._seq += 1
        assert since is not None  # something pending always has a start time
        self.in_flight = Batch(
            self.replica_id, self._seq, keys, deltas, since, wide, tuple(keyed.values())
        )
        self._in_flight_keyed = keyed
        return self.in_flight

    def settle(self, batch: Batch) -> None:
        """The batch's outcome is known (applied, or found already applied): forget it."""
        if self.in_flight is batch:
            self.in_flight = None
            self._in_flight_keyed = {}

    @property
    def pending_keys(self) -> int:
        in_flight = self.in_flight
        return len(self._pending) + self._keyed_items + (in_flight.size if in_flight else 0)

    @property
    def keyed_items_pending(self) -> int:
        in_flight = sum(len(r.items) for r in self.in_flight.keyed) if self.in_flight else 0
        return self._keyed_items + in_flight

    @property
    def is_empty(self) -> bool:
        return not self._pending and not self._keyed and self.in_flight is None

    @property
    def is_full(self) -> bool:
        return len(self._pending) + self._keyed_items >= self.max_pending_keys

    def persist_lag(self) -> float:
        """Age in seconds of the oldest delta not yet persisted (0 when there is none)."""
        oldest = self.in_flight.oldest if self.in_flight else self._pending_since
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def snapshot(self, *, in_flight: bool = True) -> dict[str, int]:
        """Everything not yet persisted, per key (for tests and shutdown accounting); keyed
        items count as if their keys were new. ``in_flight=False``: only what is pending, not
        the batch in flight."""
        totals = dict(self._pending)
        keyed = [*self._keyed.values()]
        if in_flight and self.in_flight is not None:
            batch = zip(self.in_flight.keys, self.in_flight.deltas, strict=True)
            for key, delta in [*batch, *self.in_flight.wide.items()]:
                totals[key] = totals.get(key, 0) + delta
            keyed += self.in_flight.keyed
        for request in keyed:
            for key, value in request.items:
                totals[key] = totals.get(key, 0) + value
        return totals
