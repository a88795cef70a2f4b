"""The exactly-once checker's bookkeeping (tests/test_exactly_once.py): the operations and
what each was told (or which exception it got), the keys' records and the counters in
Postgres, the lifetimes of the replicas, and the verdicts, each decided from those facts alone
(never from a clock with slack).

What a keyed operation applied is read from Postgres exactly: a key's record holds the
fingerprint of the one body applied under it and the indexes of its items that were not
applied. So every counter must equal its seed plus the applied items of the recorded bodies,
exactly, and every answer must agree with its key's record.

What a plain ``202`` (no key) applied is read from its counter: each has a counter of its own.
One may be lost only if a replica that may have answered it was SIGKILLed, and only with what
that replica had not flushed: the flushes of one replica are applied in the order of their
batches, so if a ``202`` it gave was lost, nothing it accepted after that answer came back
may be persisted (the causal order of the test's own clock: an answer received before a
request was sent).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import asyncpg

from increment_service.client import (
    IdempotencyKeyReused,
    IncrementClient,
    IncrementError,
    IncrementFailed,
    IncrementRejected,
    Result,
)
from increment_service.writebehind.accept import OPEN_SCOPE, fingerprint
from tests.support.load import Sent

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
#: The largest value a request may carry (JavaScript's safe integers).
MAX_SAFE = 2**53 - 1

#: A private edge counter's seed: +2**52 takes it to INT64_MAX exactly (fits, the edge is
#: inclusive), +MAX_SAFE would leave bigint.
PRIVATE_EDGE = INT64_MAX - 2**52
FITS_PRIVATE = 2**52
#: Shared edge counters, near the top and near the bottom: their fitting items only move them
#: away from the edge (a few thousand at most in a run), so +MAX_SAFE on a high one and
#: -MAX_SAFE on a low one overflow whatever the order of the requests.
SHARED_HIGH = INT64_MAX - 1000
SHARED_LOW = INT64_MIN + 1000

Item = tuple[str, int]
Told = Result | IncrementError


@dataclasses.dataclass(frozen=True, slots=True)
class Body:
    """A request's body: the route kind and its items (distinct counters within a batch, so
    that each item's overflow is decided alone), and which items overflow, by construction."""

    kind: str  # "single" or "batch"
    items: tuple[Item, ...]
    overflowing: tuple[int, ...] = ()

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.kind, list(self.items))


@dataclasses.dataclass(eq=False, slots=True)
class Op:
    """One operation of a client: a body under an Idempotency-Key, and what it was told."""

    label: str  # "single", "edge", "reuse", "replay"
    body: Body
    idempotency_key: str
    durable: bool
    #: Another body may be sent under the same key (a client's bug, on purpose): its 202 may
    #: be a body dropped at flush, as documented.
    shared_key: bool = False
    told: Told | None = None

    async def send(self, client: IncrementClient) -> Op:
        try:
            if self.body.kind == "single":
                ((key, value),) = self.body.items
                self.told = await client.increment(
                    key, value, durable=self.durable, idempotency_key=self.idempotency_key
                )
            else:
                self.told = await client.increments(
                    self.body.items, durable=self.durable, idempotency_key=self.idempotency_key
                )
        except IncrementError as exc:
            self.told = exc
        return self

    @property
    def succeeded(self) -> bool:
        return isinstance(self.told, Result)

    def outcome(self) -> str:
        """What the client got, for the summary: a status or an exception's name."""
        if isinstance(self.told, Result):
            return str(self.told.status)
        return type(self.told).__name__


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """A key's record in Postgres: the body applied under it, what its items were told."""

    fingerprint: bytes
    durable: bool | None
    not_applied: tuple[int, ...]


async def read_records(database_url: str) -> tuple[dict[str, Record], list[str]]:
    """The open scope's idempotency keys, and the keys recorded more than once (none: a key
    is written once)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT key, fingerprint, durable, not_applied FROM idempotency_keys WHERE scope = $1",
            OPEN_SCOPE,
        )
    finally:
        await conn.close()
    records: dict[str, Record] = {}
    twice = []
    for r in rows:
        if r["key"] in records:
            twice.append(r["key"])
        records[r["key"]] = Record(
            bytes(r["fingerprint"]), r["durable"], tuple(sorted(r["not_applied"] or ()))
        )
    return records, twice


async def seed_counters(database_url: str, seeds: Mapping[str, int]) -> None:
    """Counters set directly in Postgres before the traffic (no request can carry a value
    near the bigint edge)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO counters (key, value, updated_at)"
            " SELECT k, v, now() FROM unnest($1::text[], $2::bigint[]) AS s (k, v)",
            list(seeds),
            list(seeds.values()),
        )
    finally:
        await conn.close()


def judge_operations(
    ops: Sequence[Op],
    records: Mapping[str, Record],
    got: Mapping[str, int],
    seeds: Mapping[str, int],
    keyed_202_may_be_lost: bool = False,
) -> tuple[list[str], dict[str, int]]:
    """Every answer against its key's record, and every counter the operations touch against
    the records: (problems, the expected counters)."""
    problems: list[str] = []
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.idempotency_key].append(op)
    expected: Counter[str] = Counter(seeds)
    for key, record in records.items():
        if key not in by_key:
            problems.append(f"key {key!r} recorded, and no operation sent it")
            continue
        bodies = {op.body.fingerprint: op.body for op in by_key[key]}
        body = bodies.get(record.fingerprint)
        if body is None:
            problems.append(f"key {key!r} recorded with a body none of its operations sent")
            continue
        if record.not_applied != body.overflowing:
            problems.append(
                f"key {key!r}: recorded not applied {record.not_applied}, and exactly"
                f" {body.overflowing} overflow ({body.items})"
            )
        for n, (counter, value) in enumerate(body.items):
            if n not in record.not_applied:
                expected[counter] += value
    for op in ops:
        problem = _judge_answer(op, records.get(op.idempotency_key), keyed_202_may_be_lost)
        if problem:
            problems.append(f"{op.label} {op.idempotency_key} {op.body.items}: {problem}")
    counters = {counter for op in ops for counter, _ in op.body.items} | set(seeds)
    for counter in sorted(counters):
        if got.get(counter, 0) != expected[counter]:
            problems.append(
                f"counter {counter!r}: {got.get(counter, 0)} in Postgres, {expected[counter]}"
                f" by the records ({got.get(counter, 0) - expected[counter]:+d})"
            )
    return problems, dict(expected)


def _judge_answer(op: Op, record: Record | None, keyed_202_may_be_lost: bool) -> str | None:
    """What is false in what ``op`` was told, given its key's record (None: nothing wrong)."""
    told = op.told
    mine = record is not None and record.fingerprint == op.body.fingerprint
    if told is None:
        return "never finished"
    if isinstance(told, Result):
        if told.status in (200, 204):
            if not told.durable:
                return f"{told.status} without Preference-Applied: durable"
            if not mine:
                return f"told {told.status} (committed), and its body is not applied"
            if told.not_applied != op.body.overflowing:
                return (
                    f"told {told.status} not applied {told.not_applied}, and exactly"
                    f" {op.body.overflowing} overflow"
                )
            if (told.status == 200) != bool(told.not_applied):
                return f"told {told.status} with not applied {told.not_applied}"
            return None
        if told.status == 202:
            if op.durable:
                return "a durable request told 202"
            if not mine and not op.shared_key and not keyed_202_may_be_lost:
                return "told 202, and its body is not applied (no replica was SIGKILLed)"
            return None
        return f"told {told.status}"
    if isinstance(told, IdempotencyKeyReused):
        if mine:
            return "told IdempotencyKeyReused, and its body is the one applied under the key"
        if record is None:
            return "told IdempotencyKeyReused, and no body is recorded under the key"
        return None
    if isinstance(told, IncrementRejected):
        return f"told IncrementRejected ({told}), and its body is applied" if mine else None
    if isinstance(told, IncrementFailed):
        return None  # the outcome is unknown: applied or not, the counters say which
    return f"unexpected {told!r}"


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """How one process on a replica's port ended: when the test signalled it and when it saw
    it exit (its own monotonic clock, the clock of the traffic's records)."""

    signalled_at: float
    exited_at: float
    killed: bool  # SIGKILL: what it had not flushed is lost; SIGTERM: nothing is


class Lifetimes:
    """The processes that ran on each replica's port, one after the other. The n-th process
    on a port is the one that ended with its n-th ending (the last one: the final stop, a
    SIGTERM)."""

    def __init__(self) -> None:
        self.endings: dict[int, list[Ending]] = defaultdict(list)

    def ended(self, port: int, signalled_at: float, exited_at: float, killed: bool) -> None:
        self.endings[port].append(Ending(signalled_at, exited_at, killed))

    def candidates(self, port: int, sent: Sent) -> range:
        """Which processes on ``port`` may have answered ``sent``: one that had not exited
        when it was sent, and had started (its predecessor had exited) when the answer came."""
        exits = [e.exited_at for e in self.endings[port]]
        return range(
            bisect.bisect_left(exits, sent.sent_at), bisect.bisect_left(exits, sent.answered_at) + 1
        )

    def killed(self, port: int, n: int) -> bool:
        endings = self.endings[port]
        return n < len(endings) and endings[n].killed


def judge_plain(
    sent: Iterable[Sent],
    got: Mapping[str, int],
    answered_by: Mapping[str, int],
    lifetimes: Lifetimes,
) -> tuple[list[str], int, int]:
    """Plain increments (no key, a counter of its own each, value 1) against Postgres:
    (problems, acknowledged and lost, acknowledged by a process that was SIGKILLed)."""
    problems: list[str] = []
    lost = may_be_lost = 0
    # Per process (port, n), answered by it for certain: when each lost one was answered,
    # when each persisted one was sent.
    lost_answered: dict[tuple[int, int], list[float]] = defaultdict(list)
    persisted_sent: dict[tuple[int, int], list[float]] = defaultdict(list)
    sent_keys = set()
    for s in sent:
        sent_keys.add(s.key)
        persisted = got.get(s.key, 0)
        if persisted not in (0, s.value):
            problems.append(f"{s.request_id} ({s.key}): {persisted} persisted of {s.value}")
        if s.refused and persisted:
            problems.append(f"{s.request_id}: refused ({s.status}), and persisted")
        if not s.acknowledged:
            continue
        port = answered_by.get(s.request_id)
        if port is None:
            problems.append(f"{s.request_id}: acknowledged, and no replica answered it")
            continue
        maybe = lifetimes.candidates(port, s)
        killed = any(lifetimes.killed(port, n) for n in maybe)
        may_be_lost += killed
        if len(maybe) == 1:
            (lost_answered if not persisted else persisted_sent)[(port, maybe[0])].append(
                s.answered_at if not persisted else s.sent_at
            )
        if not persisted:
            lost += 1
            if not killed:
                problems.append(
                    f"{s.request_id}: acknowledged by {port}, lost, and no process that may"
                    " have answered it was SIGKILLed"
                )
    for process, answered in lost_answered.items():
        first_lost = min(answered)
        later = [t for t in persisted_sent.get(process, []) if t > first_lost]
        if later:
            problems.append(
                f"replica on port {process[0]}, process {process[1]}: a 202 it gave was lost,"
                f" and {len(later)} increments it accepted after that answer are persisted"
            )
    plain_keys = {k for k in got if k.startswith("plain-")}
    if plain_keys - sent_keys:
        problems.append(f"persisted and never sent: {sorted(plain_keys - sent_keys)[:5]}")
    return problems, lost, may_be_lost
