"""The write-behind: the aggregator on its own, and batches applied to a real Postgres."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from increment_service.errors import BackpressureError
from increment_service.metrics import Metrics
from increment_service.writebehind import (
    INT64_MAX,
    Aggregator,
    Batch,
    WriteBehind,
    apply_batch,
)
from tests.support.fakeclock import FakeClock
from tests.support.postgres import counters


def test_add_sums_per_key_and_freeze_swaps() -> None:
    agg = Aggregator("r", max_pending_keys=10)
    agg.add("b", 2)
    agg.add("a", 1)
    agg.add("b", 3)
    assert agg.pending_keys == 2
    batch = agg.freeze()
    assert batch is not None
    assert dict(zip(batch.keys, batch.deltas, strict=True)) == {"a": 1, "b": 5}
    assert batch.seq == 1
    # New increments go to the fresh dict while the batch is in flight.
    agg.add("a", 10)
    assert agg.freeze() is batch, "the in-flight batch is retried unchanged"
    assert agg.snapshot() == {"a": 11, "b": 5}
    agg.settle(batch)
    second = agg.freeze()
    assert second is not None
    assert (second.keys, second.deltas, second.seq) == (["a"], [10], 2)
    agg.settle(second)
    assert agg.is_empty
    assert agg.freeze() is None


def test_settle_of_a_stale_batch_keeps_the_current_one() -> None:
    agg = Aggregator("r", 10)
    agg.add("a", 1)
    batch = agg.freeze()
    assert batch is not None
    agg.settle(Batch("r", 99, [], [], 0.0))
    assert agg.in_flight is batch


def test_backpressure_refuses_new_keys_only() -> None:
    agg = Aggregator("r", max_pending_keys=2)
    agg.add("a", 1)
    agg.add("b", 1)
    assert agg.is_full
    with pytest.raises(BackpressureError) as info:
        agg.add("c", 1)
    assert info.value.retry_after == 1, "a flush interval at most: one second"
    agg.add("a", 1)  # an existing key still counts
    assert agg.snapshot() == {"a": 2, "b": 1}
    assert agg.freeze() is not None
    assert not agg.is_full, "the frozen batch frees the dict for new keys"


def test_persist_lag_is_the_age_of_the_oldest_unpersisted_delta() -> None:
    clock = FakeClock()
    agg = Aggregator("r", 10, clock=clock)
    assert agg.persist_lag() == 0.0
    agg.add("a", 1)
    clock.now += 3
    agg.add("b", 1)
    assert agg.persist_lag() == 3.0
    batch = agg.freeze()
    assert batch is not None
    clock.now += 1
    agg.add("c", 1)  # younger than the batch in flight
    clock.now += 1
    assert agg.persist_lag() == 5.0
    agg.settle(batch)
    assert agg.persist_lag() == 1.0


def test_per_key_sums_outside_bigint_are_split_out() -> None:
    agg = Aggregator("r", 10)
    for _ in range(1100):
        agg.add("huge", 2**53 - 1)
    agg.add("fine", 1)
    batch = agg.freeze()
    assert batch is not None
    assert batch.keys == ["fine"]
    assert batch.wide == {"huge": 1100 * (2**53 - 1)}
    assert agg.snapshot() == {"fine": 1, "huge": 1100 * (2**53 - 1)}


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.sampled_from("abcdefgh"), st.integers(-1000, 1000)),
            st.tuples(st.just("freeze"), st.none(), st.none()),
            st.tuples(st.just("settle"), st.none(), st.none()),
            st.tuples(st.just("fail"), st.none(), st.none()),
        ),
        max_size=200,
    )
)
def test_property_nothing_is_lost_or_counted_twice(
    ops: list[tuple[str, str | None, int | None]],
) -> None:
    """Random increments and random flush points (some failing and retried): what was applied
    plus what is still pending always equals what was added, and each seq applies once."""
    agg = Aggregator("r", max_pending_keys=100)
    added: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    applied_seqs: set[int] = set()
    for op, key, value in ops:
        if op == "add":
            assert key is not None
            assert value is not None
            agg.add(key, value)
            added[key] += value
        elif op in ("settle", "fail"):
            batch = agg.freeze()
            if batch is None:
                continue
            if batch.seq not in applied_seqs:  # what applied_batches does in Postgres
                applied_seqs.add(batch.seq)
                applied.update(dict(zip(batch.keys, batch.deltas, strict=True)))
            if op == "settle":  # "fail": committed, but the outcome never reached us
                agg.settle(batch)
        else:
            agg.freeze()
        pending = Counter(agg.snapshot())
        if agg.in_flight is not None and agg.in_flight.seq in applied_seqs:
            # Committed but unsettled: a retry will find its id and add nothing.
            pending.subtract(dict(zip(agg.in_flight.keys, agg.in_flight.deltas, strict=True)))
        for k in set(added) | set(applied) | set(pending):
            assert applied[k] + pending.get(k, 0) == added[k]


def _batch(seq: int, deltas: dict[str, int], replica: str = "r1") -> Batch:
    keys = sorted(deltas)
    return Batch(replica, seq, keys, [deltas[k] for k in keys], 0.0)


async def test_apply_batch_is_additive_and_idempotent(clean: None, pg: asyncpg.Connection) -> None:
    first = await apply_batch(pg, _batch(1, {"a": 1, "b": 2}), statement_timeout=10)
    assert first.fresh
    assert first.rejected == []
    await apply_batch(pg, _batch(2, {"a": 10, "c": -3}), statement_timeout=10)
    again = await apply_batch(pg, _batch(2, {"a": 10, "c": -3}), statement_timeout=10)
    assert not again.fresh, "a retry of an applied batch id adds nothing"
    other_replica = await apply_batch(pg, _batch(2, {"a": 100}, replica="r2"), statement_timeout=10)
    assert other_replica.fresh
    assert await counters(pg) == {"a": 111, "b": 2, "c": -3}
    assert await pg.fetchval("SELECT count(*) FROM applied_batches") == 3


async def test_overflowing_key_is_rejected_and_the_rest_applied(
    clean: None, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "INSERT INTO counters VALUES ('near-max', $1, now()), ('near-min', $2, now())",
        INT64_MAX - 5,
        -INT64_MAX,
    )
    applied = await apply_batch(
        pg, _batch(1, {"near-max": 10, "near-min": -5, "ok": 7}), statement_timeout=10
    )
    assert sorted(applied.rejected) == ["near-max", "near-min"]
    assert await counters(pg) == {"near-max": INT64_MAX - 5, "near-min": -INT64_MAX, "ok": 7}
    exact = await apply_batch(pg, _batch(2, {"near-max": 5}), statement_timeout=10)
    assert exact.rejected == []
    assert (await counters(pg))["near-max"] == INT64_MAX


async def test_concurrent_replicas_on_the_same_keys_never_deadlock(
    clean: None, database_url: str
) -> None:
    """Postgres applies a batch's keys in one order, whatever order a replica sends them in,
    so overlapping batches from many replicas serialize instead of deadlocking."""
    keys = [f"k{i:04d}" for i in range(2000)]
    conns = [await asyncpg.connect(database_url) for _ in range(6)]

    def shuffled(seed: int) -> Batch:
        order = random.Random(seed).sample(keys, len(keys))
        return Batch(f"r{seed}", 1, order, [1] * len(order), 0.0)

    try:
        await asyncio.gather(
            *(apply_batch(conn, shuffled(n), statement_timeout=30) for n, conn in enumerate(conns))
        )
        totals = await counters(conns[0])
    finally:
        for conn in conns:
            await conn.close()
    assert totals == dict.fromkeys(keys, 6)


async def test_close_without_postgres_reports_what_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutdown with Postgres unreachable: the final flush gives up at its deadline and says
    how much was lost instead of hanging."""
    pool = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0)
    write_behind = WriteBehind(
        pool, Metrics(), replica_id="r", flush_interval=0.1, max_pending_keys=10
    )
    write_behind.add("a", 1)
    write_behind.add("b", 2)
    caplog.set_level("INFO", logger="increment_service.writebehind")
    await write_behind.close(within=0.5)
    await pool.close()
    lost = [r for r in caplog.records if getattr(r, "event", None) == "shutdown"]
    assert len(lost) == 1
    assert (lost[0].keys, lost[0].sum) == (2, 3)  # type: ignore[attr-defined]


async def test_a_delta_wider_than_bigint_applies_when_the_total_fits(
    clean: None, pg: asyncpg.Connection
) -> None:
    """The spec rejects a delta only when the stored total would leave bigint: a summed delta
    above 2^63 still lands on a counter far enough below zero."""
    wide = 1100 * (2**53 - 1)  # about 9.9e18 > 2^63 - 1
    await pg.execute(
        "INSERT INTO counters VALUES ('deep', $1, now()), ('shallow', 0, now())", -(2**62)
    )
    batch = Batch("r1", 1, ["ok"], [1], 0.0, {"deep": wide, "shallow": wide, "new": wide})
    applied = await apply_batch(pg, batch, statement_timeout=10)
    assert sorted(applied.rejected) == ["new", "shallow"]
    assert await counters(pg) == {"deep": wide - 2**62, "shallow": 0, "ok": 1}
    retried = await apply_batch(pg, batch, statement_timeout=10)
    assert not retried.fresh
    assert (await counters(pg))["deep"] == wide - 2**62, "counted once"
