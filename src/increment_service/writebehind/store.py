"""The write-behind's storage functions: each takes a connection and runs statements.py.

``apply_batch`` applies a batch in ONE statement, in one implicit transaction: it records the
batch id in ``applied_batches``, records the idempotency keys it carries, and adds every delta
to ``counters``. A retry of a batch whose commit outcome was unknown finds its id recorded and
adds nothing (no double counting).

**Idempotency keys.** A request with an ``Idempotency-Key`` cannot be summed into the dict: the
same key may reach two replicas, and only the first to commit may count. So a batch carries
keyed requests one by one, and its statement inserts their keys (sorted, before any counter,
so replicas cannot deadlock) with ``ON CONFLICT``, adding only the items of the keys that were
new. Keys live in ``idempotency_keys``, a ring of four partitions by time bucket
(``floor(epoch / ttl)``, Postgres's clock): a key is looked up in the current bucket and the
one before, and the partition two buckets behind is emptied with ``TRUNCATE``
(``empty_next_partition``; migration 0004). Near the start of a bucket a statement may run
beside one that began in the bucket before, and neither would see the other's uncommitted key;
so for the first ``GRACE_SECONDS`` of a bucket keys are claimed in the previous bucket's
partition too, where the two statements meet on one unique index. Past the grace, every
statement of the previous bucket has ended (a server-side ``statement_timeout`` well below the
grace bounds them), and a plain lookup sees its keys.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import asyncpg

from ..db import Connection
from ..tables import IDEMPOTENCY_SLOTS
from .items import KEY_SEPARATOR, Batch
from .statements import (
    APPLY_BATCH_SQL,
    APPLY_KEYED_BATCH_SQL,
    APPLY_PLAIN_BATCH_SQL,
    BUCKET_SQL,
    PRUNE_SQL,
    RECORDED_SQL,
    REJECTED_BEFORE_SQL,
)

log = logging.getLogger("increment_service.writebehind")  # one logger for the package

#: After a bucket starts, how long keys are claimed in the previous bucket's partition too.
#: It must exceed the longest a statement can run: the pool's statement_timeout (db.py).
GRACE_SECONDS = 60


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
        REJECTED_BEFORE_SQL, batch.replica_id, batch.seq, timeout=statement_timeout
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
            RECORDED_SQL,
            [batch.keyed[n].scope for n in unseen],
            [batch.keyed[n].key for n in unseen],
            timeout=statement_timeout,
        )
        found = {(r["scope"], r["key"]): bytes(r["fingerprint"]) for r in rows}
        for n in unseen:
            if batch.keyed[n].ident in found:
                recorded[n] = found[batch.keyed[n].ident]
    return Applied(row["fresh"], rejected, claimed, recorded)


async def prune(conn: Connection) -> None:
    """Forget applied batch ids (and their rejections) older than a day: a retry of a batch
    comes within seconds, never a day later."""
    await conn.execute(PRUNE_SQL, timeout=30)


async def empty_next_partition(
    conn: Connection, idempotency_ttl: float, emptied: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Empty the idempotency partition the next bucket will use (it holds keys three buckets
    old, if any): TRUNCATE, O(1). Nobody reads or writes that partition now: statements use
    the current bucket and the one before. Postgres's clock decides, as in the statement; near
    the end of a bucket this waits for the next one.

    ``emptied`` is what the last call returned: (partition, bucket) once it is emptied for this
    bucket, so that the next call does nothing until the bucket changes. None: not now."""
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        row = await conn.fetchrow(BUCKET_SQL, int(idempotency_ttl), timeout=5)
        assert row is not None  # the SELECT returns exactly one row
        bucket, left = int(row["bucket"]), float(row["left"])
        slot = (bucket + 1) % IDEMPOTENCY_SLOTS
        if emptied == (slot, bucket) or left < 10:
            return emptied
        # Which partition is this module's arithmetic, never input.
        partition = f"idempotency_keys_{slot}"
        if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {partition})", timeout=5):  # noqa: S608
            # Waits for the statements that lock every partition: not for long.
            await conn.execute(f"TRUNCATE {partition}", timeout=10)
            log.info(
                "idempotency keys expired",
                extra={"event": "idempotency-expiry", "partition": partition},
            )
        return (slot, bucket)
