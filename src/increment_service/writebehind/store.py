"""The write-behind's storage functions: each takes a connection and runs statements.py.

``apply_batch`` applies a batch in ONE statement, in one implicit transaction: it records the
batch id in ``applied_batches``, records the idempotency keys it carries, and adds every delta
to ``counters``. A retry of a batch whose commit outcome was unknown finds its id recorded and
adds nothing (no double counting).

**Idempotency keys.** A request with an ``Idempotency-Key`` cannot be summed into the dict: the
same key may reach two replicas, and only the first to commit may count. So a batch carries
keyed requests one by one; its transaction first takes an advisory lock per key (in one order:
two statements claiming one key run one after the other, and the second sees the first's
record), then its statement inserts each key (sorted, before any counter, so replicas cannot
deadlock) where no live record of it exists, adding only the items of the keys it claimed.
Keys live in ``idempotency_keys``, a ring of four partitions by time bucket (``floor(epoch /
ttl)``, Postgres's clock), each key written once, into its bucket's partition: a record is
live for ``IDEMPOTENCY_TTL_SECONDS`` after it was made, and so lies in the current bucket's
partition or the one before; the partition the next bucket will use (three buckets old) is
emptied with ``TRUNCATE`` (``empty_next_partition``; migrations 0004 and 0005).

**What was answered.** Each key's record keeps what its request's first answer said (durable
or not, and which items were not applied), so that every retry is told the same, on every
replica; ``request_rejections`` keeps the same per batch and request, for the retry of a
batch whose commit outcome was unknown.

**In order.** The requests of a batch are applied as if each had committed alone, in order,
and the summed deltas last. A counter that only one of them changes is applied or refused by
the statement; a counter that several change is locked by it and settled here, request by
request, on the locked row (rare: the same counter in two requests of one batch). A batch of
requests without keys goes first as one sum, checked against its running totals
(inorder.running_bounds), and in order only when a total is near the edge.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from ..db import Connection
from ..tables import IDEMPOTENCY_SLOTS
from .clock import BOUNDARY_SECONDS, PostgresClock
from .inorder import (
    Changes,
    alone,
    changes_by_counter,
    in_item_order,
    running_bounds,
    settle,
    totals_after,
)
from .items import KEY_SEPARATOR, Batch, Keyed, Recorded, Totals
from .records import (
    Applied,
    applied_before,
    dump_totals,
    lookup_records,
    parse_record,
    rejected_before,
)
from .statements import (
    APPLY_BATCH_SQL,
    APPLY_BOUNDED_SQL,
    APPLY_PLAIN_BATCH_SQL,
    APPLY_REQUESTS_SQL,
    DROP_PLACEHOLDERS_SQL,
    LOCK_KEYS_SQL,
    LOCKED_COUNTERS_SQL,
    READ_TOTALS_SQL,
    RECORD_REJECTIONS_SQL,
    RECORD_TOTALS_SQL,
    SET_COUNTERS_SQL,
)

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


def _joined(items: Iterable[tuple[str, int]]) -> tuple[str, str]:
    pairs = list(items)
    return (
        KEY_SEPARATOR.join(key for key, _ in pairs),
        ",".join(str(value) for _, value in pairs),
    )


async def apply_batch(
    conn: Connection,
    batch: Batch,
    statement_timeout: float,
    idempotency_ttl: float = 3600.0,
    clock: PostgresClock | None = None,
) -> Applied:
    """Apply ``batch``: in one statement when it carries no requests; else in one transaction
    (advisory locks on its keys, the statement, and rarely the counters several of its requests
    change and the record of what was not applied)."""
    head = (
        batch.replica_id,
        batch.seq,
        KEY_SEPARATOR.join(batch.keys),
        ",".join(map(str, batch.deltas)),
        list(batch.wide),
        list(batch.wide.values()),
    )
    if not batch.requests and not batch.wide:
        try:
            status = await conn.execute(APPLY_PLAIN_BATCH_SQL, *head[:4], timeout=statement_timeout)
        except asyncpg.NumericValueOutOfRangeError:
            pass  # a total would leave bigint: nothing was applied; the next one says which
        else:
            if int(status.rsplit(" ", 1)[1]) > 0:
                return Applied(fresh=True, rejected=[])
            return Applied(
                fresh=False, rejected=await rejected_before(conn, batch, statement_timeout)
            )
    if batch.requests:
        bounded = await _apply_bounded(conn, batch, statement_timeout)
        if bounded is not None:
            return bounded
    if not batch.requests:
        row = await conn.fetchrow(APPLY_BATCH_SQL, *head, timeout=statement_timeout)
        assert row is not None  # the outer SELECT always returns exactly one row
        if not row["fresh"]:
            return Applied(False, await rejected_before(conn, batch, statement_timeout))
        return Applied(fresh=True, rejected=list(row["rejected"]))
    # Alone (no key to lock or to record an outcome with, no counter to settle in order), the
    # one statement says all, in its own implicit transaction, as a plain batch does.
    unlocked = alone(batch)
    transaction: AbstractAsyncContextManager[Any] = (
        contextlib.nullcontext() if unlocked else conn.transaction()
    )
    async with transaction:
        return await _apply_requests(
            conn, batch, head, statement_timeout, idempotency_ttl, clock, unlocked
        )


async def _apply_bounded(
    conn: Connection, batch: Batch, statement_timeout: float
) -> Applied | None:
    """Apply a batch of unkeyed requests as one sum when every running total fits (then order
    cannot change the outcome). None: it was not applied so (keyed requests, a total near the
    edge, or a retry of a batch applied before), and nothing was done; the in-order path
    decides."""
    bounded = running_bounds(batch)
    if bounded is None:
        return None
    everything = frozenset(range(len(batch.requests)))
    wanted = {n for n, r in enumerate(batch.requests) if r.representation}
    keys, deltas = _joined(zip(bounded.keys, bounded.deltas, strict=True))
    try:
        if not bounded.shared and not wanted:  # no order to check, no totals: the plain one
            status = await conn.execute(
                APPLY_PLAIN_BATCH_SQL,
                batch.replica_id,
                batch.seq,
                keys,
                deltas,
                timeout=statement_timeout,
            )
            if int(status.rsplit(" ", 1)[1]) == 0:  # "INSERT 0 n": n keys, 0 if a retry
                return None
            return Applied(fresh=True, rejected=[], claimed=everything)
        row = await conn.fetchrow(
            APPLY_BOUNDED_SQL,
            batch.replica_id,
            batch.seq,
            keys,
            deltas,
            KEY_SEPARATOR.join(bounded.shared),
            ",".join(map(str, bounded.low)),
            ",".join(map(str, bounded.high)),
            bool(wanted),
            timeout=statement_timeout,
        )
    except asyncpg.NumericValueOutOfRangeError:
        return None  # some total would leave bigint: the statement applied nothing
    assert row is not None  # the outer SELECT always returns exactly one row
    if not row["fresh"]:
        return None
    totals: dict[int, Totals] = {}
    if wanted:
        final = dict(zip(row["keys"], row["totals"], strict=True))
        changes = changes_by_counter(batch.requests, everything)
        totals = _totals(batch, totals_after(changes, final, {}, {}, wanted), row["at"])
    return Applied(fresh=True, rejected=[], claimed=everything, totals=totals)


def _totals(
    batch: Batch, after: dict[int, dict[str, int]], at: datetime.datetime
) -> dict[int, Totals]:
    return {
        n: Totals(in_item_order(batch.requests[n].items, mine), at) for n, mine in after.items()
    }


async def _apply_requests(
    conn: Connection,
    batch: Batch,
    head: tuple[Any, ...],
    statement_timeout: float,
    idempotency_ttl: float,
    clock: PostgresClock | None,
    alone: bool,
) -> Applied:
    """``alone``: alone(batch), which decided that this runs outside a transaction."""
    requests = batch.requests
    keyed = [(n, r) for n, r in enumerate(requests) if isinstance(r, Keyed)]
    if keyed and not (clock is not None and clock.far_from_a_boundary(idempotency_ttl)):
        await conn.execute(
            LOCK_KEYS_SQL,
            [r.scope for _, r in keyed],
            [r.key for _, r in keyed],
            int(idempotency_ttl),
            BOUNDARY_SECONDS,
            timeout=statement_timeout,
        )
    owners = [n for n, request in enumerate(requests, 1) for _ in request.items]
    positions = [i for request in requests for i in range(len(request.items))]
    item_keys, item_values = _joined(item for r in requests for item in r.items)
    row = await conn.fetchrow(
        APPLY_REQUESTS_SQL,
        *head,
        [r.scope if isinstance(r, Keyed) else None for r in requests],
        [r.key if isinstance(r, Keyed) else None for r in requests],
        [r.fingerprint if isinstance(r, Keyed) else None for r in requests],
        [r.durable if isinstance(r, Keyed) else False for r in requests],
        owners,
        item_keys,
        item_values,
        int(idempotency_ttl),
        IDEMPOTENCY_SLOTS,
        alone,
        positions,
        timeout=statement_timeout,
    )
    assert row is not None  # the outer SELECT always returns exactly one row
    if clock is not None:
        clock.saw(row["postgres_now"])
    if not row["fresh"]:
        return await applied_before(conn, batch, statement_timeout, idempotency_ttl)
    applied = frozenset(n - 1 for n in row["applied"])
    recorded: dict[int, Recorded] = {}
    ages: dict[int, float] = {}
    for n, fingerprint, durable, not_applied, age, totals_text, at in zip(
        row["recorded_n"],
        row["recorded_fingerprint"],
        row["recorded_durable"],
        row["recorded_not_applied"],
        row["recorded_age"],
        row["recorded_totals"],
        row["recorded_at"],
        strict=True,
    ):
        indexes = [int(i) for i in not_applied.split(",")] if not_applied else []
        recorded[n - 1], ages[n - 1] = parse_record(
            fingerprint, durable, indexes, age, totals_text, at
        )
    unseen = {n: r for n, r in keyed if n not in applied and n not in recorded}
    if unseen:
        # Claimed by a statement that took no advisory lock (a replica of an earlier version)
        # and committed while this one ran: invisible to it, visible to a query of its own.
        found = await lookup_records(
            conn, [r.ident for r in unseen.values()], idempotency_ttl, statement_timeout
        )
        for n, request in unseen.items():
            if request.ident in found:
                recorded[n], ages[n] = found[request.ident]
    rejected_items: dict[int, set[int]] = {}
    summed_rejected: list[str] = []
    wanted = {n for n in applied if requests[n].representation}
    changes: Changes = {}
    if row["rejected"] or row["shared"] or wanted:
        changes = changes_by_counter(requests, applied)
        # A counter one request changes: refused whole by the statement (that request's
        # items on it); one only the summed deltas change: refused as their key.
        for key in row["rejected"]:
            if key in changes:
                n, _, items = changes[key][0]
                rejected_items.setdefault(n, set()).update(items)
            else:
                summed_rejected.append(key)
        if row["shared"]:
            await _settle_in_order(
                conn,
                batch,
                changes,
                list(row["shared"]),
                rejected_items,
                summed_rejected,
                statement_timeout,
            )
    not_applied = {n: tuple(sorted(items)) for n, items in rejected_items.items()}
    if (not_applied or summed_rejected) and not alone:  # (alone, the statement recorded them)
        claimed_keyed = [(n, r) for n, r in keyed if n in applied and n in not_applied]
        await conn.execute(
            RECORD_REJECTIONS_SQL,
            batch.replica_id,
            batch.seq,
            [n + 1 for n in not_applied],
            [",".join(map(str, items)) for items in not_applied.values()],
            summed_rejected,
            [r.scope for _, r in claimed_keyed],
            [r.key for _, r in claimed_keyed],
            [",".join(map(str, not_applied[n])) for n, _ in claimed_keyed],
            int(idempotency_ttl),
            IDEMPOTENCY_SLOTS,
            timeout=statement_timeout,
        )
    totals: dict[int, Totals] = {}
    if wanted:
        totals = await _read_totals(
            conn,
            batch,
            changes,
            rejected_items,
            summed_rejected,
            wanted,
            statement_timeout,
            idempotency_ttl,
        )
    return Applied(True, summed_rejected, applied, recorded, ages, not_applied, totals)


async def _read_totals(
    conn: Connection,
    batch: Batch,
    changes: Changes,
    rejected_items: dict[int, set[int]],
    summed_rejected: list[str],
    wanted: set[int],
    statement_timeout: float,
    idempotency_ttl: float,
) -> dict[int, Totals]:
    """return=representation, in the batch's transaction: the counters' totals read back
    (their rows are locked by it), worked back to each asking request's running totals, and
    kept in the records of the keyed ones."""
    keys = sorted({key for key, steps in changes.items() if any(n in wanted for n, _, _ in steps)})
    rows = await conn.fetch(READ_TOTALS_SQL, keys, timeout=statement_timeout)
    at = rows[0]["at"] if rows else await conn.fetchval("SELECT now()")
    final = {r["key"]: r["value"] for r in rows}
    sums = {k: d for k, d in zip(batch.keys, batch.deltas, strict=True) if k not in summed_rejected}
    sums |= {k: d for k, d in batch.wide.items() if k not in summed_rejected}
    totals = _totals(batch, totals_after(changes, final, rejected_items, sums, wanted), at)
    keyed = [(n, r) for n, r in enumerate(batch.requests) if n in totals and isinstance(r, Keyed)]
    if keyed:
        await conn.execute(
            RECORD_TOTALS_SQL,
            [r.scope for _, r in keyed],
            [r.key for _, r in keyed],
            [dump_totals(totals[n]) for n, _ in keyed],
            int(idempotency_ttl),
            IDEMPOTENCY_SLOTS,
            timeout=statement_timeout,
        )
    return totals


async def _settle_in_order(
    conn: Connection,
    batch: Batch,
    changes: Changes,
    shared: list[str],
    rejected_items: dict[int, set[int]],
    summed_rejected: list[str],
    statement_timeout: float,
) -> None:
    """The counters several requests of the batch change (locked by its statement): each
    request's change applied or refused in order, as if it had committed alone, then the
    summed deltas. Fills ``rejected_items`` and ``summed_rejected``."""
    rows = await conn.fetch(LOCKED_COUNTERS_SQL, shared, timeout=statement_timeout)
    values = {r["key"]: r["value"] for r in rows}
    placeholders = {r["key"] for r in rows if r["placeholder"]}
    wanted = set(shared)
    sums = {k: d for k, d in zip(batch.keys, batch.deltas, strict=True) if k in wanted}
    sums |= {k: d for k, d in batch.wide.items() if k in wanted}
    changed = settle(shared, values, changes, sums, rejected_items, summed_rejected)
    if changed:
        await conn.execute(
            SET_COUNTERS_SQL, list(changed), list(changed.values()), timeout=statement_timeout
        )
    # A row the statement inserted to lock it, to which nothing was applied: never a counter.
    if placeholders - changed.keys():
        await conn.execute(
            DROP_PLACEHOLDERS_SQL, list(placeholders - changed.keys()), timeout=statement_timeout
        )
