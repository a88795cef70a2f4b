"""The upkeep of the write-behind's tables, each step a function taking a connection: batch
ids forgotten after a day, and the idempotency partition whose keys have expired emptied whole
(migrations 0004 and 0005; store.py says how keys are claimed)."""

from __future__ import annotations

import logging

from ..db import Connection
from ..tables import IDEMPOTENCY_SLOTS
from .statements import BUCKET_SQL, PRUNE_SQL

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


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
