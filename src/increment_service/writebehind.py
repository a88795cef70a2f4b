"""The write-behind: increments are summed in memory and applied to Postgres in batches.

The whole mechanism lives in this module:

* ``Aggregator`` is the in-memory part, free of I/O: a dict of per-key deltas that the request
  handlers add to, swapped for an empty one when a batch is frozen; beside it, the requests
  that carry an Idempotency-Key (``Keyed``), which travel one by one.
* ``apply_batch`` is the only SQL: ONE statement that records the batch id in
  ``applied_batches``, records the idempotency keys it carries, and adds every delta to
  ``counters`` with an additive UPSERT. All of it happens in one implicit transaction, so a
  retry of a batch whose commit outcome was unknown finds its id already recorded and adds
  nothing (no double counting).
* ``WriteBehind`` is the asyncio side: a task that freezes and applies a batch every
  ``flush_interval`` seconds, retries with backoff while Postgres is unreachable, empties the
  idempotency partition whose time has passed, and runs a final flush at shutdown.

Only one batch is in flight per replica: while it is being retried, new increments gather in
the fresh dict, and the frozen batch is retried unchanged (same ``seq``) until its outcome is
known. Replicas never conflict because every UPSERT is additive and Postgres applies the keys
in one order (``ORDER BY key COLLATE "C"``), so concurrent batches lock rows in the same order
and cannot deadlock.

**Idempotency keys.** A request with an ``Idempotency-Key`` cannot be summed into the dict:
the same key may reach two replicas, and only the first to commit may count. So a batch
carries keyed requests one by one, and its statement inserts their keys (sorted, before any
counter, so replicas cannot deadlock) with ``ON CONFLICT``, adding only the items of the keys
that were new. Keys live in ``idempotency_keys``, a ring of four partitions by time bucket
(``floor(epoch / ttl)``, Postgres's clock): a key is looked up in the current bucket and the
one before, and the partition two buckets behind is emptied with ``TRUNCATE`` (migration 0004).
Near the start of a bucket a statement may run beside one that began in the bucket before, and
neither would see the other's uncommitted key; so for the first ``GRACE_SECONDS`` of a bucket
keys are claimed in the previous bucket's partition too, where the two statements meet on one
unique index. Past the grace, every statement of the previous bucket has ended (a server-side
``statement_timeout`` well below the grace bounds them), and a plain lookup sees its keys.

The event loop does as little of a flush as it can: freezing is two list copies (the sort is
Postgres's), and the keys and deltas travel as two strings rather than two arrays of 100,000
elements each (asyncpg encodes those element by element on the loop: 0.2 s at 100k keys, now
about 0.03 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from . import keys
from .db import Connection
from .errors import ServiceUnavailable
from .metrics import Metrics
from .tables import IDEMPOTENCY_SLOTS
from .tracing import TRACER_NAME

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
#: After a bucket starts, how long keys are claimed in the previous bucket's partition too.
#: It must exceed the longest a statement can run: the pool's statement_timeout (db.py).
GRACE_SECONDS = 60
#: How many recently applied idempotency keys a replica remembers, to answer a retry that comes
#: back to it at once (a replay, or a 422 for another body) without asking Postgres.
_KNOWN_KEYS = 100_000


class BackpressureError(ServiceUnavailable):
    """The replica holds ``max_pending_keys`` keys and items and cannot take more."""

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

Ident = tuple[str, str]  # (scope, idempotency key)


@dataclasses.dataclass(frozen=True, slots=True)
class Keyed:
    """A request with an Idempotency-Key: applied whole, once, or not at all."""

    scope: str  # whose keys these are: a user, or the open routes
    key: str
    fingerprint: bytes  # the route kind and the items (validation.fingerprint)
    items: tuple[tuple[str, int], ...]

    @property
    def ident(self) -> Ident:
        return (self.scope, self.key)


class KeyedOutcome(enum.Enum):
    ACCEPTED = "accepted"  # new here: it goes out with the next batch
    REPLAY = "replay"  # this replica has it already, same body: the same answer again
    CONFLICT = "conflict"  # this replica has it already, another body: never applied


class Durable(enum.Enum):
    """How a durable request ended (see WriteBehind.commit_durably)."""

    COMMITTED = "committed"  # in Postgres (some items may be rejected: see .rejected)
    REPLAY = "replay"  # its key was applied before, with this body: committed then
    CONFLICT = "conflict"  # its key was applied before, with another body: never applied
    NOT_SENT = "not-sent"  # never sent to Postgres: nothing applied
    UNKNOWN = "unknown"  # sent, no answer in time: the group is retried until it is known


@dataclasses.dataclass(frozen=True, slots=True)
class DurableAnswer:
    outcome: Durable
    rejected: frozenset[str] = frozenset()  # counter keys whose total would leave bigint


@dataclasses.dataclass(eq=False, slots=True)
class _Waiting:
    """A durable request waiting for the commit of its group."""

    items: tuple[tuple[str, int], ...]
    keyed: Keyed | None
    answer: asyncio.Future[DurableAnswer]
    sent: bool = False  # its group's statement went to Postgres
    abandoned: bool = False  # answered 503 before it was sent: it must never be


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
    keyed: tuple[Keyed, ...] = ()

    @property
    def size(self) -> int:
        """Keys and keyed items: what the batch holds against MAX_PENDING_KEYS."""
        return len(self.keys) + len(self.wide) + sum(len(k.items) for k in self.keyed)


class Aggregator:
    """Per-process sums of unpersisted increments, and the keyed requests beside them.

    No I/O; not thread-safe (one event loop)."""

    def __init__(
        self,
        replica_id: str,
        max_pending_keys: int,
        clock: Callable[[], float] = time.monotonic,
        idempotency_ttl: float = 3600.0,
    ) -> None:
        self.replica_id = replica_id
        self.max_pending_keys = max_pending_keys
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._pending_since: float | None = None
        self._keyed: dict[Ident, Keyed] = {}
        self._keyed_items = 0  # items of self._keyed, each counted against max_pending_keys
        self._seq = 0
        self.in_flight: Batch | None = None
        self._in_flight_keyed: dict[Ident, Keyed] = {}
        # Keys this replica saw applied (or found applied), with their fingerprint, until
        # the monotonic time they may be forgotten. Oldest first.
        self._known: collections.OrderedDict[Ident, tuple[bytes, float]] = collections.OrderedDict()
        self._known_ttl = idempotency_ttl

    def add(self, key: str, value: int) -> None:
        pending = self._pending
        if key in pending:
            pending[key] += value
            return
        if len(pending) + self._keyed_items >= self.max_pending_keys:
            raise BackpressureError(retry_after=1)
        if not pending:
            self._started()
        pending[key] = value

    def add_many(self, items: Sequence[tuple[str, int]]) -> None:
        """A batch of increments, admitted whole or refused whole (nothing added)."""
        pending = self._pending
        new_keys = {key for key, _ in items if key not in pending}
        if len(pending) + self._keyed_items + len(new_keys) > self.max_pending_keys:
            raise BackpressureError(retry_after=1)
        if not pending:
            self._started()
        for key, value in items:
            pending[key] = pending.get(key, 0) + value

    def add_keyed(self, request: Keyed) -> KeyedOutcome:
        """A keyed request goes out with the next batch, unless this replica knows its key."""
        known = self.fingerprint_of(request.ident)
        if known is not None:
            return KeyedOutcome.REPLAY if known == request.fingerprint else KeyedOutcome.CONFLICT
        if len(self._pending) + self._keyed_items + len(request.items) > self.max_pending_keys:
            raise BackpressureError(retry_after=1)
        if not self._pending and not self._keyed:
            self._started()
        self._keyed[request.ident] = request
        self._keyed_items += len(request.items)
        return KeyedOutcome.ACCEPTED

    def _started(self) -> None:
        if self._pending_since is None:
            self._pending_since = self._clock()

    def fingerprint_of(self, ident: Ident) -> bytes | None:
        """The fingerprint this replica holds for a key: pending, in flight, or applied."""
        found = self.lookup(ident)
        return None if found is None else found[0]

    def lookup(self, ident: Ident) -> tuple[bytes, bool] | None:
        """(fingerprint, applied) of a key this replica holds: applied, or still in memory."""
        waiting = self._keyed.get(ident) or self._in_flight_keyed.get(ident)
        if waiting is not None:
            return waiting.fingerprint, False
        known = self._known.get(ident)
        if known is None:
            return None
        if known[1] <= self._clock():
            del self._known[ident]
            return None
        return known[0], True

    def remember(self, applied: Iterable[tuple[Ident, bytes]]) -> None:
        """Keys found applied in Postgres, for the retries that come back here."""
        until = self._clock() + self._known_ttl
        known = self._known
        for ident, fingerprint in applied:
            known.pop(ident, None)
            known[ident] = (fingerprint, until)
        while len(known) > _KNOWN_KEYS:
            known.popitem(last=False)

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
        keys, deltas = list(pending), list(pending.values())
        wide: dict[str, int] = {}
        # min and max run in C: the per-key test below only when some sum left bigint.
        if deltas and (min(deltas) < INT64_MIN or max(deltas) > INT64_MAX):
            wide = {k: d for k, d in pending.items() if not INT64_MIN <= d <= INT64_MAX}
            keys = [k for k in keys if k not in wide]
            deltas = [pending[k] for k in keys]
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

    def snapshot(self) -> dict[str, int]:
        """Everything not yet persisted, per key (for tests and shutdown accounting); keyed
        items count as if their keys were new."""
        totals = dict(self._pending)
        keyed = [*self._keyed.values()]
        if self.in_flight is not None:
            batch = zip(self.in_flight.keys, self.in_flight.deltas, strict=True)
            for key, delta in [*batch, *self.in_flight.wide.items()]:
                totals[key] = totals.get(key, 0) + delta
            keyed += self.in_flight.keyed
        for request in keyed:
            for key, value in request.items:
                totals[key] = totals.get(key, 0) + value
        return totals


# --- the statements -------------------------------------------------------------------------
#
# Both statements record the batch id first (`fresh`: empty when a retry finds it recorded,
# and then nothing below adds anything), then build `delta` (keys whose sum fits a bigint) and
# `wide` (the rare sums that do not), then apply them with _APPLY. A key whose new total would
# leave bigint is not updated (the WHERE of DO UPDATE) and is reported back as rejected (and
# recorded in batch_rejections, where a retry of the batch finds it); every other key is still
# applied. A wide delta can only update an existing row whose total then still fits, since a
# new row would hold the delta itself.

_APPLY = """
upserted AS (
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
), widened AS (
    UPDATE counters AS c
    SET value = (c.value + w.delta)::bigint, updated_at = now()
    FROM wide AS w
    WHERE c.key = w.key
      AND c.value + w.delta BETWEEN -9223372036854775808 AND 9223372036854775807
    RETURNING c.key
), rejected AS (
    -- Which keys were rejected is only worked out when some were: the counts are cheap, the
    -- anti-join over a large batch is not, and a CASE runs its subquery only when needed.
    SELECT CASE WHEN (SELECT count(*) FROM upserted) + (SELECT count(*) FROM widened)
                     < (SELECT count(*) FROM delta) + (SELECT count(*) FROM wide)
                THEN ARRAY (
                    (SELECT key FROM delta EXCEPT ALL SELECT key FROM upserted)
                    UNION ALL
                    (SELECT key FROM wide EXCEPT ALL SELECT key FROM widened))
                ELSE '{}'::text[] END AS keys
), recorded AS (
    INSERT INTO batch_rejections (replica_id, seq, keys, recorded_at)
    SELECT $1, $2, keys, now() FROM rejected WHERE cardinality(keys) > 0
)
SELECT EXISTS (SELECT FROM fresh) AS fresh, (SELECT keys FROM rejected) AS rejected"""

_RECORD_BATCH = """
WITH fresh AS (
    INSERT INTO applied_batches (replica_id, seq, applied_at)
    VALUES ($1, $2, now())
    ON CONFLICT DO NOTHING
    RETURNING 1
)"""

# The default path, as a batch almost always is (summed deltas that fit a bigint, no keyed
# requests): the batch id and one additive UPSERT, nothing returned but the row count ("INSERT
# 0 n": n is the number of keys, or 0 if a retry found the id recorded). A total that would
# leave bigint makes it fail whole (numeric_value_out_of_range), and the batch goes again as
# APPLY_BATCH_SQL, which says which keys were refused. Returning nothing saves the UPSERT a
# row per key to hand back: 13 % of a 100k-key batch, measured.
APPLY_PLAIN_BATCH_SQL = """
WITH fresh AS (
    INSERT INTO applied_batches (replica_id, seq, applied_at)
    VALUES ($1, $2, now())
    ON CONFLICT DO NOTHING
    RETURNING 1
)
INSERT INTO counters AS c (key, value, updated_at)
SELECT d.key, d.delta, now()
FROM unnest(
    string_to_array($3::text, E'\\x1f'), string_to_array($4::text, ',')::bigint[]
) AS d (key, delta)
WHERE EXISTS (SELECT FROM fresh)
-- One order for every replica, as in _APPLY.
ORDER BY d.key COLLATE "C"
ON CONFLICT (key) DO UPDATE
    SET value = c.value + excluded.value, updated_at = excluded.updated_at
"""

# Summed deltas, with which keys were rejected ($3 keys joined by KEY_SEPARATOR, $4 deltas
# joined by commas; $5/$6 the wide ones as arrays).
APPLY_BATCH_SQL = (
    _RECORD_BATCH  # noqa: S608 -- this module's constant strings, no input
    + """, delta AS (
    SELECT d.key, d.delta
    FROM unnest(
        string_to_array($3::text, E'\\x1f'), string_to_array($4::text, ',')::bigint[]
    ) AS d (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), wide AS (
    SELECT w.key, w.delta
    FROM unnest($5::text[], $6::numeric[]) AS w (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), """
    + _APPLY
)

# With keyed requests: $7 scopes, $8 keys, $9 fingerprints (one per request), $10 the request
# (1-based) of each item, $11 the items' counter keys (joined), $12 their values (joined), $13
# the bucket width (IDEMPOTENCY_TTL_SECONDS), $14 GRACE_SECONDS, $15 the number of partitions
# (tables.IDEMPOTENCY_SLOTS). A request's items count only if its key is
# claimed: inserted into the current bucket's partition (and, within GRACE_SECONDS of the
# bucket's start, into the previous bucket's one as well). A row left there from an older
# bucket is stale and is taken over. Keyed items and summed deltas meet in one sum per
# counter key (numeric: a sum of items may leave bigint; the `wide` path takes those).
APPLY_KEYED_BATCH_SQL = (
    _RECORD_BATCH  # noqa: S608 -- this module's constant strings, no input
    + """, generation AS (
    SELECT b AS bucket, extract(epoch FROM now()) - b * $13 < $14 AS near
    FROM (SELECT floor(extract(epoch FROM now()) / $13)::bigint AS b) AS t
), request AS (
    SELECT r.n, r.scope, r.key, r.fingerprint
    FROM unnest($7::text[], $8::text[], $9::bytea[])
        WITH ORDINALITY AS r (scope, key, fingerprint, n)
    WHERE EXISTS (SELECT FROM fresh)
), earlier_claim AS (
    INSERT INTO idempotency_keys AS k (slot, scope, key, bucket, fingerprint, recorded_at)
    SELECT ((g.bucket - 1) % $15::bigint)::smallint, r.scope, r.key, g.bucket - 1,
           r.fingerprint, now()
    FROM request AS r CROSS JOIN generation AS g
    WHERE g.near
    ORDER BY r.scope COLLATE "C", r.key COLLATE "C"
    ON CONFLICT (slot, scope, key) DO UPDATE
        SET bucket = excluded.bucket, fingerprint = excluded.fingerprint,
            recorded_at = excluded.recorded_at
        WHERE k.bucket < excluded.bucket
    RETURNING k.scope, k.key
), claim AS (
    INSERT INTO idempotency_keys AS k (slot, scope, key, bucket, fingerprint, recorded_at)
    SELECT (g.bucket % $15::bigint)::smallint, r.scope, r.key, g.bucket,
           r.fingerprint, now()
    FROM request AS r CROSS JOIN generation AS g
    WHERE CASE WHEN g.near
               THEN EXISTS (
                   SELECT FROM earlier_claim AS e WHERE e.scope = r.scope AND e.key = r.key)
               ELSE NOT EXISTS (
                   SELECT FROM idempotency_keys AS e
                   WHERE e.slot = ((g.bucket - 1) % $15::bigint)::smallint
                     AND e.scope = r.scope AND e.key = r.key AND e.bucket = g.bucket - 1)
          END
    ORDER BY r.scope COLLATE "C", r.key COLLATE "C"
    ON CONFLICT (slot, scope, key) DO UPDATE
        SET bucket = excluded.bucket, fingerprint = excluded.fingerprint,
            recorded_at = excluded.recorded_at
        WHERE k.bucket < excluded.bucket
    RETURNING k.scope, k.key
), claimed AS (
    SELECT r.n FROM request AS r JOIN claim AS c ON c.scope = r.scope AND c.key = r.key
), every_delta AS (
    SELECT d.key, sum(d.delta) AS delta
    FROM (
        SELECT u.key, u.delta::numeric
        FROM unnest(
            string_to_array($3::text, E'\\x1f'), string_to_array($4::text, ',')::bigint[]
        ) AS u (key, delta)
        WHERE EXISTS (SELECT FROM fresh)
        UNION ALL
        SELECT w.key, w.delta
        FROM unnest($5::text[], $6::numeric[]) AS w (key, delta)
        WHERE EXISTS (SELECT FROM fresh)
        UNION ALL
        SELECT i.key, i.value::numeric
        FROM unnest(
            $10::bigint[],
            string_to_array($11::text, E'\\x1f'),
            string_to_array($12::text, ',')::bigint[]
        ) AS i (n, key, value)
        WHERE i.n IN (SELECT n FROM claimed)
    ) AS d
    GROUP BY d.key
), delta AS (
    SELECT key, delta::bigint AS delta FROM every_delta
    WHERE delta BETWEEN -9223372036854775808 AND 9223372036854775807
), wide AS (
    SELECT key, delta FROM every_delta
    WHERE NOT delta BETWEEN -9223372036854775808 AND 9223372036854775807
), """
    + _APPLY
    + """,
    ARRAY (SELECT n FROM claimed ORDER BY n) AS claimed,
    -- What is recorded for the keys that were not claimed, as far as this statement can see
    -- (a claim committed by a concurrent statement after it began is not visible).
    ARRAY (
        SELECT ROW (r.n, k.fingerprint)
        FROM request AS r CROSS JOIN generation AS g
        JOIN idempotency_keys AS k
          ON k.scope = r.scope AND k.key = r.key AND k.bucket >= g.bucket - 1
         AND k.slot IN ((g.bucket % $15::bigint)::smallint,
                        ((g.bucket - 1) % $15::bigint)::smallint)
        WHERE r.n NOT IN (SELECT n FROM claimed)
        ORDER BY r.n
    ) AS recorded_before"""
)

PRUNE_SQL = (
    "WITH batches AS (DELETE FROM applied_batches WHERE applied_at < now() - interval '1 day')"
    " DELETE FROM batch_rejections WHERE recorded_at < now() - interval '1 day'"
)
_BUCKET_SQL = """
SELECT b AS bucket, (b + 1) * $1 - extract(epoch FROM clock_timestamp()) AS left
FROM (SELECT floor(extract(epoch FROM clock_timestamp()) / $1)::bigint AS b) AS t
"""
# The newest record of each key (its fingerprint), whatever its bucket: only asked about keys a
# statement just failed to claim, so a record it finds is within the last two buckets.
_RECORDED_SQL = """
SELECT DISTINCT ON (k.scope, k.key) k.scope, k.key, k.fingerprint
FROM unnest($1::text[], $2::text[]) AS r (scope, key)
JOIN idempotency_keys AS k ON k.scope = r.scope AND k.key = r.key
ORDER BY k.scope, k.key, k.bucket DESC
"""
_REJECTED_BEFORE_SQL = "SELECT keys FROM batch_rejections WHERE replica_id = $1 AND seq = $2"


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    fresh: bool  # False: this batch id had already been applied by an earlier attempt
    rejected: list[str]  # keys whose total would have left the bigint range
    # Keyed requests (indexes into batch.keyed) whose key was new: their items were applied.
    claimed: frozenset[int] = frozenset()
    # For the others, the fingerprint recorded for their key, where the statement saw it.
    recorded_before: dict[int, bytes] = dataclasses.field(default_factory=dict)


def _joined(items: Iterable[tuple[str, int]]) -> tuple[str, str]:
    pairs = list(items)
    return (
        KEY_SEPARATOR.join(key for key, _ in pairs),
        ",".join(str(value) for _, value in pairs),
    )


async def _rejected_before(conn: Connection, batch: Batch, statement_timeout: float) -> list[str]:
    """A retry of a batch applied before: what it rejected then, if anything (a query of its
    own: the retry's snapshot may predate that commit)."""
    before = await conn.fetchval(
        _REJECTED_BEFORE_SQL, batch.replica_id, batch.seq, timeout=statement_timeout
    )
    return list(before or [])


async def apply_batch(
    conn: Connection,
    batch: Batch,
    statement_timeout: float,
    idempotency_ttl: float = 3600.0,
    grace: float = GRACE_SECONDS,
) -> Applied:
    """Apply ``batch`` in one statement (the keyed one only when it carries keyed requests).

    ``grace`` is GRACE_SECONDS but in tests, which set it to take either path for sure."""
    head = (
        batch.replica_id,
        batch.seq,
        KEY_SEPARATOR.join(batch.keys),
        ",".join(map(str, batch.deltas)),
        list(batch.wide),
        list(batch.wide.values()),
    )
    if not batch.keyed and not batch.wide:
        try:
            status = await conn.execute(APPLY_PLAIN_BATCH_SQL, *head[:4], timeout=statement_timeout)
        except asyncpg.NumericValueOutOfRangeError:
            pass  # a total would leave bigint: nothing was applied; the next one says which
        else:
            if int(status.rsplit(" ", 1)[1]) > 0:
                return Applied(fresh=True, rejected=[])
            return Applied(
                fresh=False, rejected=await _rejected_before(conn, batch, statement_timeout)
            )
    if not batch.keyed:
        row = await conn.fetchrow(APPLY_BATCH_SQL, *head, timeout=statement_timeout)
    else:
        owners = [n for n, request in enumerate(batch.keyed, 1) for _ in request.items]
        item_keys, item_values = _joined(item for r in batch.keyed for item in r.items)
        row = await conn.fetchrow(
            APPLY_KEYED_BATCH_SQL,
            *head,
            [r.scope for r in batch.keyed],
            [r.key for r in batch.keyed],
            [r.fingerprint for r in batch.keyed],
            owners,
            item_keys,
            item_values,
            int(idempotency_ttl),
            grace,
            IDEMPOTENCY_SLOTS,
            timeout=statement_timeout,
        )
    assert row is not None  # the outer SELECT always returns exactly one row
    rejected = list(row["rejected"])
    if not row["fresh"]:
        rejected = await _rejected_before(conn, batch, statement_timeout)
    if not batch.keyed:
        return Applied(fresh=row["fresh"], rejected=rejected)
    claimed = frozenset(n - 1 for n in row["claimed"])
    recorded = {n - 1: bytes(fingerprint) for n, fingerprint in row["recorded_before"]}
    unseen = [n for n in range(len(batch.keyed)) if n not in claimed and n not in recorded]
    if unseen:
        # Claimed by a statement that committed while this one ran: invisible to it, visible
        # to a query of its own (rare: the same key on two replicas at the same moment).
        rows = await conn.fetch(
            _RECORDED_SQL,
            [batch.keyed[n].scope for n in unseen],
            [batch.keyed[n].key for n in unseen],
            timeout=statement_timeout,
        )
        found = {(r["scope"], r["key"]): bytes(r["fingerprint"]) for r in rows}
        for n in unseen:
            if batch.keyed[n].ident in found:
                recorded[n] = found[batch.keyed[n].ident]
    return Applied(row["fresh"], rejected, claimed, recorded)


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
        idempotency_ttl: float = 3600.0,
        durable_timeout: float = 5.0,
        tracer: Tracer | None = None,
    ) -> None:
        # A fresh suffix per process start: seq restarts at 1, and a batch id must never
        # collide with one recorded by an earlier incarnation of the same replica.
        incarnation = f"{replica_id}:{secrets.token_hex(6)}"
        # Durable groups have sequence numbers of their own, under an id of their own in the
        # same ledger: they commit beside the timer's batch, never as part of it.
        self.durable_id = f"{incarnation}/durable"
        self._durable_seq = 0
        self.durable_timeout = durable_timeout
        self._waiting: list[_Waiting] = []
        self._waiting_keys: dict[Ident, _Waiting] = {}
        self._durable_wakeup = asyncio.Event()
        self._in_commit: asyncio.Future[None] | None = None
        self.aggregator = Aggregator(incarnation, max_pending_keys, idempotency_ttl=idempotency_ttl)
        self.idempotency_ttl = idempotency_ttl
        self.pool = pool
        self.metrics = metrics
        self.flush_interval = flush_interval
        self.tracer = tracer
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        # A deadline, not "time since the last prune": the monotonic clock starts near zero
        # after boot, so no value of it can stand for "long ago".
        self._next_prune = time.monotonic() + _PRUNE_EVERY_SECONDS
        # Which idempotency partition was last emptied, in which bucket (see _expire...).
        self._emptied: tuple[int, int] | None = None
        self._next_expiry = time.monotonic()
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

    def add_many(self, items: Sequence[tuple[str, int]]) -> None:
        try:
            self.aggregator.add_many(items)
        except BackpressureError:
            self.metrics.backpressure_rejections.inc()
            raise

    def add_keyed(self, request: Keyed) -> KeyedOutcome:
        try:
            outcome = self.aggregator.add_keyed(request)
        except BackpressureError:
            self.metrics.backpressure_rejections.inc()
            raise
        if outcome is KeyedOutcome.REPLAY:
            self.metrics.idempotent_replays.labels("request").inc()
        elif outcome is KeyedOutcome.CONFLICT:
            self.metrics.idempotency_conflicts.labels("request").inc()
        return outcome

    def start(self, offset: float = 0.0) -> None:
        """Start the loops; the first flush comes ``offset`` seconds later than an interval
        (workers of one process stagger their flushes, see cli.run_worker)."""
        self._tasks = [
            asyncio.create_task(
                self._run(self.flush_interval + offset), name="write-behind flusher"
            ),
            asyncio.create_task(self._observe_often(), name="write-behind gauges"),
        ]
        self._committer = asyncio.create_task(self._commit_groups(), name="durable committer")

    # -- durable acknowledgement ---------------------------------------------------------

    @property
    def committing(self) -> bool:
        """A durable group is on its way to Postgres (or retried for its outcome)."""
        return self._in_commit is not None and not self._in_commit.done()

    def waiting_durably(self, ident: Ident) -> bool:
        """A durable request with this key waits for its commit here (a retry gets 409)."""
        return ident in self._waiting_keys

    async def commit_durably(
        self, items: Sequence[tuple[str, int]], keyed: Keyed | None = None
    ) -> DurableAnswer:
        """Commit ``items`` (and ``keyed``'s key) with the next group, and say how it went.

        The replica's waiting durable requests are committed together, one group at a time:
        the next group starts as soon as the previous one commits (group commit). A request
        still waiting after ``durable_timeout`` is answered: NOT_SENT if its group never went to
        Postgres (and then it never will), UNKNOWN if it did (the group is retried under the
        same id until its outcome is known)."""
        pending = self.aggregator.pending_keys + sum(len(w.items) for w in self._waiting)
        if pending + len(items) > self.aggregator.max_pending_keys:
            self.metrics.backpressure_rejections.inc()
            raise BackpressureError(retry_after=1)
        waiting = _Waiting(tuple(items), keyed, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if keyed is not None:
            self._waiting_keys[keyed.ident] = waiting
        self._durable_wakeup.set()
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(asyncio.shield(waiting.answer), self.durable_timeout)
        except TimeoutError:
            if waiting.sent:
                answer = DurableAnswer(Durable.UNKNOWN)
            else:
                waiting.abandoned = True
                self._forget(waiting)
                answer = DurableAnswer(Durable.NOT_SENT)
        finally:
            self.metrics.durable_seconds.observe(time.perf_counter() - started)
        self.metrics.durable_requests.labels(answer.outcome.value).inc()
        return answer

    def _forget(self, waiting: _Waiting) -> None:
        if waiting.keyed is not None and self._waiting_keys.get(waiting.keyed.ident) is waiting:
            del self._waiting_keys[waiting.keyed.ident]
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiting)

    async def _commit_groups(self) -> None:
        while True:
            await self._durable_wakeup.wait()
            self._durable_wakeup.clear()
            group = [w for w in self._waiting if not w.abandoned]
            self._waiting = []
            if group:
                self._in_commit = asyncio.ensure_future(self._commit_group(group))
                try:
                    await self._in_commit
                except Exception:  # pragma: no cover -- a bug: answer, and go on committing
                    log.exception("durable group error", extra={"event": "durable"})
                    for waiting in group:
                        if not waiting.answer.done():
                            waiting.answer.set_result(DurableAnswer(Durable.UNKNOWN))
                finally:
                    for waiting in group:
                        self._forget(waiting)
            if self._waiting:
                self._durable_wakeup.set()

    async def _commit_group(self, group: list[_Waiting]) -> None:
        """Send ``group`` as one batch; retry it under the same id until its outcome is
        known. Requests that time out before it is sent leave it (they were answered 503)."""
        failures = 0
        batch: Batch | None = None
        while True:
            try:
                async with self.pool.acquire(timeout=self.durable_timeout) as conn:
                    if batch is None:
                        group[:] = [w for w in group if not w.abandoned]
                        if not group:
                            return  # every request gave up before anything was sent
                        batch = self._group_batch(group)
                        for waiting in group:
                            waiting.sent = True
                        self.metrics.durable_group_size.observe(len(group))
                    applied = await apply_batch(
                        conn,
                        batch,
                        statement_timeout=max(5.0, self.durable_timeout),
                        idempotency_ttl=self.idempotency_ttl,
                    )
            except Exception as exc:  # noqa: BLE001 -- retried until the outcome is known
                failures += 1
                self.metrics.flush_failures.inc()
                log.warning(
                    "durable group failed, will retry" if batch else "durable group not sent",
                    extra={
                        "event": "durable",
                        "outcome": "error",
                        "seq": batch.seq if batch else None,
                        "requests": len(group),
                        "error": f"{type(exc).__name__}: {exc}",
                        "attempt": failures,
                    },
                )
                await asyncio.sleep(min(1.0, _FIRST_BACKOFF_SECONDS * 2**failures))
                continue
            if applied.rejected:
                self._reject(batch, applied.rejected)
            if batch.keyed:
                self._settle_keyed(batch, applied)
            self._answer(group, batch, applied)
            return

    def _group_batch(self, group: list[_Waiting]) -> Batch:
        """One batch of a group: unkeyed items summed per counter key, keyed ones as they are."""
        sums: dict[str, int] = {}
        keyed: list[Keyed] = []
        for waiting in group:
            if waiting.keyed is not None:
                keyed.append(waiting.keyed)
                continue
            for key, value in waiting.items:
                sums[key] = sums.get(key, 0) + value
        keys = [k for k, d in sums.items() if INT64_MIN <= d <= INT64_MAX]
        wide = {k: d for k, d in sums.items() if not INT64_MIN <= d <= INT64_MAX}
        self._durable_seq += 1
        return Batch(
            self.durable_id,
            self._durable_seq,
            keys,
            [sums[k] for k in keys],
            time.monotonic(),
            wide,
            tuple(keyed),
        )

    def _answer(self, group: list[_Waiting], batch: Batch, applied: Applied) -> None:
        rejected = frozenset(applied.rejected)
        position = {request.ident: n for n, request in enumerate(batch.keyed)}
        for waiting in group:
            if waiting.answer.done():
                continue
            outcome = Durable.COMMITTED
            if waiting.keyed is not None:
                n = position[waiting.keyed.ident]
                if n not in applied.claimed:
                    recorded = applied.recorded_before.get(n)
                    same = recorded is None or recorded == waiting.keyed.fingerprint
                    outcome = Durable.REPLAY if same else Durable.CONFLICT
            mine = frozenset(k for k, _ in waiting.items) & rejected
            if outcome is Durable.COMMITTED or not applied.fresh:
                # A retry that found its own group applied earlier: committed then.
                waiting.answer.set_result(DurableAnswer(outcome, mine))
            else:
                waiting.answer.set_result(DurableAnswer(outcome))

    async def _run(self, delay: float) -> None:
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
                await self._expire_idempotency_keys()
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
                        conn,
                        batch,
                        statement_timeout=max(5.0, self.flush_interval),
                        idempotency_ttl=self.idempotency_ttl,
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
        if batch.keyed:
            self._settle_keyed(batch, applied)
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

    def _settle_keyed(self, batch: Batch, applied: Applied) -> None:
        """Remember what was applied; count (and log) the keyed requests that were not."""
        found: list[tuple[Ident, bytes]] = []
        conflicts: list[Keyed] = []
        for n, request in enumerate(batch.keyed):
            if n in applied.claimed:
                found.append((request.ident, request.fingerprint))
                continue
            recorded = applied.recorded_before.get(n)
            if recorded is None or recorded == request.fingerprint:
                # Applied before, by this request's first attempt (on this or another replica),
                # or by a statement that committed while this one ran (unseen: the same key
                # from two replicas at once is a retry, hence the same body, almost surely).
                self.metrics.idempotent_replays.labels("flush").inc()
                found.append((request.ident, recorded or request.fingerprint))
            else:
                # Another body under a key already used: never applied.
                self.metrics.idempotency_conflicts.labels("flush").inc()
                conflicts.append(request)
                found.append((request.ident, recorded))
        self.aggregator.remember(found)
        if conflicts:
            log.warning(
                "keyed requests dropped: their Idempotency-Key was used for another body",
                extra={
                    "event": "idempotency-conflict",
                    "replica_id": batch.replica_id,
                    "seq": batch.seq,
                    "requests": len(conflicts),
                    "keys": [request.key[:64] for request in conflicts[:20]],
                },
            )

    async def _expire_idempotency_keys(self) -> None:
        """Empty the idempotency partition the next bucket will use (it holds keys three
        buckets old, if any): TRUNCATE, O(1). Nobody reads or writes that partition now:
        statements use the current bucket and the one before. Postgres's clock decides, as in
        the statement; near the end of a bucket this waits for the next one."""
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + min(60.0, self.idempotency_ttl / 8)
        try:
            async with self.pool.acquire(timeout=self.flush_interval) as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '2s'")
                row = await conn.fetchrow(_BUCKET_SQL, int(self.idempotency_ttl), timeout=5)
                assert row is not None
                bucket, left = int(row["bucket"]), float(row["left"])
                slot = (bucket + 1) % IDEMPOTENCY_SLOTS
                if self._emptied == (slot, bucket) or left < 10:
                    return
                # Which partition is this module's arithmetic, never input.
                partition = f"idempotency_keys_{slot}"
                if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {partition})", timeout=5):  # noqa: S608
                    # Waits for the statements that lock every partition: not for long.
                    await conn.execute(f"TRUNCATE {partition}", timeout=10)
                    log.info(
                        "idempotency keys expired",
                        extra={"event": "idempotency-expiry", "partition": partition},
                    )
                self._emptied = (slot, bucket)
        except Exception:
            log.warning("emptying an idempotency partition failed", exc_info=True)

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
        self.metrics.keyed_items_pending.set(self.aggregator.keyed_items_pending)
        self.metrics.persist_lag.set(self.aggregator.persist_lag())

    async def close(self, within: float) -> None:
        """Stop the loop, then flush everything left, retrying for at most ``within`` seconds.

        Durable requests were answered while requests drained (each within its timeout); a
        group still retried for an unknown outcome goes on for the rest of the budget."""
        committer = getattr(self, "_committer", None)
        if committer is not None:
            if self._in_commit is not None and not self._in_commit.done():
                await asyncio.wait({self._in_commit}, timeout=within / 2)
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
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


async def write_behind_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registered after Postgres and Redis, so its final flush runs while both are open."""
    settings = app[keys.SETTINGS]
    provider = app.get(keys.TRACER_PROVIDER)
    write_behind = WriteBehind(
        app[keys.PG_POOL],
        app[keys.METRICS],
        replica_id=settings.replica_id,
        flush_interval=settings.flush_interval_seconds,
        max_pending_keys=settings.max_pending_keys,
        idempotency_ttl=settings.idempotency_ttl_seconds,
        durable_timeout=settings.durable_timeout_seconds,
        tracer=provider.get_tracer(TRACER_NAME) if provider is not None else None,
    )
    app[keys.WRITE_BEHIND] = write_behind
    write_behind.start(offset=app.get(keys.FLUSH_OFFSET, 0.0))
    yield
    # Requests have drained by now (aiohttp waits for them before cleanup); what is left of
    # the shutdown budget goes to the final flush.
    await write_behind.close(within=settings.final_flush_seconds)
