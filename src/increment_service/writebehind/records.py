"""What a batch's statement did and what was recorded before it: ``Applied`` (apply_batch's
outcome), the idempotency keys' records, and, for a retry of a batch whose commit outcome was
unknown, what its first attempt did (read back: the retry's statement adds nothing).

Storage functions: each takes a connection (store.py's statements write what these read).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

import orjson

from ..db import Connection
from ..tables import IDEMPOTENCY_SLOTS
from .items import Batch, Ident, Keyed, Recorded, Totals
from .statements import RECORDED_SQL, REJECTED_BEFORE_SQL, REQUEST_REJECTIONS_SQL


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
    # Per request that asked for return=representation and was applied by this statement.
    totals: dict[int, Totals] = dataclasses.field(default_factory=dict)


async def rejected_before(conn: Connection, batch: Batch, statement_timeout: float) -> list[str]:
    """A retry of a batch applied before: what it rejected then, if anything (a query of its
    own: the retry's snapshot may predate that commit)."""
    before = await conn.fetchval(
        REJECTED_BEFORE_SQL, batch.replica_id, batch.seq, timeout=statement_timeout
    )
    return list(before or [])


def parse_totals(text: str | None, at: datetime.datetime) -> Totals | None:
    """A record's totals column (JSON text; NULL or '' when its answer carried none)."""
    if not text:
        return None
    return Totals(tuple((str(key), int(value)) for key, value in orjson.loads(text)), at)


def dump_totals(totals: Totals) -> str:
    return orjson.dumps([list(pair) for pair in totals.counters]).decode()


def parse_record(
    fingerprint: Any,
    durable: Any,
    not_applied: Sequence[int] | None,
    age: Any,
    totals: str | None,
    at: datetime.datetime,
) -> tuple[Recorded, float]:
    """A key's record as the statements return it, and its age in seconds."""
    record = Recorded(
        bytes(fingerprint), bool(durable), tuple(not_applied or ()), parse_totals(totals, at)
    )
    return record, float(age)


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
        (r["scope"], r["key"]): parse_record(
            r["fingerprint"],
            r["durable"],
            r["not_applied"],
            r["age"],
            r["totals"],
            r["recorded_at"],
        )
        for r in rows
    }


async def applied_before(
    conn: Connection, batch: Batch, statement_timeout: float, idempotency_ttl: float
) -> Applied:
    """A retry of a batch with requests that was applied before (its commit outcome was
    unknown): what it did then, read back. Its keyed requests' records say what they were
    answered (their totals included); the others, what request_rejections kept (no totals:
    those were in the answer that was lost)."""
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
        rejected=await rejected_before(conn, batch, statement_timeout),
        recorded_before={n: found[r.ident][0] for n, r in keyed if r.ident in found},
        recorded_age={n: found[r.ident][1] for n, r in keyed if r.ident in found},
        not_applied=not_applied,
    )
