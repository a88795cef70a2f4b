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
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from ..db import Connection
from ..tables import IDEMPOTENCY_SLOTS
from .clock import BOUNDARY_SECONDS, PostgresClock
from .inorder import Changes, changes_by_counter, running_bounds, settle
from .items import KEY_SEPARATOR, Batch, Ident, Keyed, Recorded
from .statements import (
    APPLY_BATCH_SQL,
    APPLY_BOUNDED_SQL,
    APPLY_PLAIN_BATCH_SQL,
    APPLY_REQUESTS_SQL,
    DROP_PLACEHOLDERS_SQL,
    LOCK_KEYS_SQL,
    LOCKED_COUNTERS_SQL,
    RECORD_REJECTIONS_SQL,
    RECORDED_SQL,
    REJECTED_BEFORE_SQL,
    REQUEST_REJECTIONS_SQL,
    SET_COUNTERS_SQL,
)

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    fresh: bool  # False: this batch id had already been applied by an earlier attempt
    rejected: list[str]  # keys of the summed deltas whose total would have left bigint
    # Requests (indexes into batch.requests) this statement applied: those without a key and
    # those whose key was new. (Empty when not fresh.)
    claimed: frozenset[int] = frozenset()
    # For the keyed requests it did not claim, their key's live record, and its age (s).
    recorded_before: dict[int, Recorded] = dataclasses.field(default_factory=dict)
    recorded_age: dict[int, float] = dataclasses.field(default_factory=dict)
    # Per request: the indexes of its items that were not applied (absent: all applied).
    not_applied: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)


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


def _record(row: Any) -> tuple[Recorded, float]:
    """A key's record as the statements return it, and its age in seconds."""
    record = Recorded(bytes(row[0]), bool(row[1]), tuple(row[2] or ()))
    return record, float(row[3])


async def lookup_records(
    conn: Connection, idents: Sequence[Ident], idempotency_ttl: float, statement_timeout: float
) -> dict[Ident, tuple[Recorded, float]]:
    """The live records of these keys (a primary-key lookup), with their ages."""
    rows = await conn.fetch(
        RECORDED_SQL,
        [scope for scope, _ in idents],
        [key for _, key in idents],
        int(idempotency_ttl),
        IDEMPOTENCY_SLOTS,
        timeout=statement_timeout,
    )
    return {
        (r["scope"], r["key"]): _record(
            (r["fingerprint"], r["durable"], r["not_applied"], r["age"])
        )
        for r in rows
    }


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
                fresh=False, rejected=await _rejected_before(conn, batch, statement_timeout)
            )
    if batch.requests and await _apply_bounded(conn, batch, statement_timeout):
        return Applied(fresh=True, rejected=[], claimed=frozenset(range(len(batch.requests))))
    if not batch.requests:
        row = await conn.fetchrow(APPLY_BATCH_SQL, *head, timeout=statement_timeout)
        assert row is not None  # the outer SELECT always returns exactly one row
        if not row["fresh"]:
            return Applied(False, await _rejected_before(conn, batch, statement_timeout))
        return Applied(fresh=True, rejected=list(row["rejected"]))
    # Alone (no key to lock or to record an outcome with, no counter to settle in order), the
    # one statement says all, in its own implicit transaction, as a plain batch does.
    alone = _alone(batch)
    transaction: AbstractAsyncContextManager[Any] = (
        contextlib.nullcontext() if alone else conn.transaction()
    )
    async with transaction:
        return await _apply_requests(
            conn, batch, head, statement_timeout, idempotency_ttl, clock, alone
        )


async def _apply_bounded(conn: Connection, batch: Batch, statement_timeout: float) -> bool:
    """Apply a batch of unkeyed requests as one sum when every running total fits (then order
    cannot change the outcome): True if it was applied so, now. False: it was not (keyed
    requests, a total near the edge, or a retry of a batch applied before), and nothing was
    done; the in-order path decides."""
    bounded = running_bounds(batch)
    if bounded is None:
        return False
    keys, deltas = _joined(zip(bounded.keys, bounded.deltas, strict=True))
    try:
        if not bounded.shared:  # no counter changed twice: the plain statement says all
            status = await conn.execute(
                APPLY_PLAIN_BATCH_SQL,
                batch.replica_id,
                batch.seq,
                keys,
                deltas,
                timeout=statement_timeout,
            )
            return int(status.rsplit(" ", 1)[1]) > 0  # "INSERT 0 n": n keys, 0 if a retry
        row = await conn.fetchrow(
            APPLY_BOUNDED_SQL,
            batch.replica_id,
            batch.seq,
            keys,
            deltas,
            KEY_SEPARATOR.join(bounded.shared),
            ",".join(map(str, bounded.low)),
            ",".join(map(str, bounded.high)),
            timeout=statement_timeout,
        )
    except asyncpg.NumericValueOutOfRangeError:
        return False  # some total would leave bigint: the statement applied nothing
    assert row is not None  # the outer SELECT always returns exactly one row
    return bool(row["fresh"])


def _alone(batch: Batch) -> bool:
    """Whether the batch's requests have no key, no summed deltas beside them, and no counter
    that two of them change (a durable group of plain requests, almost always)."""
    if batch.keys or batch.wide:
        return False
    seen: set[str] = set()
    for request in batch.requests:
        if isinstance(request, Keyed):
            return False
        mine = {key for key, _ in request.items}
        if not seen.isdisjoint(mine):
            return False
        seen |= mine
    return True


async def _apply_requests(
    conn: Connection,
    batch: Batch,
    head: tuple[Any, ...],
    statement_timeout: float,
    idempotency_ttl: float,
    clock: PostgresClock | None,
    alone: bool,
) -> Applied:
    """``alone``: _alone(batch), which decided that this runs outside a transaction."""
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
        return await _applied_before(conn, batch, statement_timeout, idempotency_ttl)
    applied = frozenset(n - 1 for n in row["applied"])
    recorded: dict[int, Recorded] = {}
    ages: dict[int, float] = {}
    for n, fingerprint, durable, not_applied, age in zip(
        row["recorded_n"],
        row["recorded_fingerprint"],
        row["recorded_durable"],
        row["recorded_not_applied"],
        row["recorded_age"],
        strict=True,
    ):
        indexes = [int(i) for i in not_applied.split(",")] if not_applied else []
        recorded[n - 1], ages[n - 1] = _record((fingerprint, durable, indexes, age))
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
    if row["rejected"] or row["shared"]:
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
    return Applied(True, summed_rejected, applied, recorded, ages, not_applied)


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


async def _applied_before(
    conn: Connection, batch: Batch, statement_timeout: float, idempotency_ttl: float
) -> Applied:
    """A retry of a batch with requests that was applied before (its commit outcome was
    unknown): what it did then, read back. Its keyed requests' records say what they were
    answered; the others, what request_rejections kept."""
    rows = await conn.fetch(
        REQUEST_REJECTIONS_SQL, batch.replica_id, batch.seq, timeout=statement_timeout
    )
    not_applied = {r["request"] - 1: tuple(r["items"]) for r in rows}
    keyed = [(n, r) for n, r in enumerate(batch.requests) if isinstance(r, Keyed)]
    found = await lookup_records(
        conn, [r.ident for _, r in keyed], idempotency_ttl, statement_timeout
    )
    return Applied(
        fresh=False,
        rejected=await _rejected_before(conn, batch, statement_timeout),
        recorded_before={n: found[r.ident][0] for n, r in keyed if r.ident in found},
        recorded_age={n: found[r.ident][1] for n, r in keyed if r.ident in found},
        not_applied=not_applied,
    )
