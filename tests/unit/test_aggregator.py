"""The aggregator alone (writebehind/aggregator.py, writebehind/items.py): no server, no I/O, a
clock of the test's own. These are the tests `tox -e mutation` runs against the aggregator."""

from __future__ import annotations

import pytest

from increment_service.errors import BackpressureError
from increment_service.writebehind import aggregator as aggregator_module
from increment_service.writebehind.aggregator import KNOWN_KEYS, Aggregator
from increment_service.writebehind.items import (
    INT64_MAX,
    INT64_MIN,
    KEY_SEPARATOR,
    Batch,
    Keyed,
    Recorded,
    Unkeyed,
    split_wide,
)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def keyed(key: str, *items: tuple[str, int], scope: str = "open", durable: bool = False) -> Keyed:
    return Keyed(scope, key, b"fp-" + key.encode(), tuple(items), durable)


# Read through functions: mypy would narrow a property from one assert to the next.
def full(agg: Aggregator) -> bool:
    return agg.is_full


def empty(agg: Aggregator) -> bool:
    return agg.is_empty


def in_flight(agg: Aggregator) -> Batch | None:
    return agg.in_flight


def make(limit: int = 10, ttl: float = 60.0) -> tuple[Aggregator, Clock]:
    clock = Clock()
    return Aggregator("r", limit, clock=clock, idempotency_ttl=ttl), clock


# --- items ---------------------------------------------------------------------------------


def test_the_int64_bounds_and_the_separator() -> None:
    assert (INT64_MIN, INT64_MAX) == (-(2**63), 2**63 - 1)
    assert KEY_SEPARATOR == "\x1f"


def test_a_keyed_request_is_identified_by_its_scope_and_key() -> None:
    request = keyed("k", ("a", 1))
    assert request.ident == ("open", "k")
    assert not request.durable
    assert keyed("k", ("a", 1), durable=True).durable
    assert Recorded(b"f") == Recorded(b"f", False, ())


def test_a_batch_counts_its_keys_wide_keys_and_request_items() -> None:
    one, two = keyed("k1", ("a", 1), ("b", 2)), Unkeyed((("c", 3),))
    batch = Batch("r", 1, ["x", "y"], [1, 2], 0.0, {"w": 2**64}, (one, two))
    assert batch.size == 2 + 1 + 3
    assert batch.keyed == (one,)
    plain = Batch("r", 1, [], [], 0.0)
    assert (plain.size, plain.keyed, plain.wide, plain.requests) == (0, (), {}, ())


@pytest.mark.parametrize(
    ("sums", "fits", "wide"),
    [
        ({}, {}, {}),
        ({"a": INT64_MAX, "b": INT64_MIN}, {"a": INT64_MAX, "b": INT64_MIN}, {}),
        ({"a": INT64_MAX + 1, "b": 1}, {"b": 1}, {"a": INT64_MAX + 1}),
        ({"a": INT64_MIN - 1, "b": 1}, {"b": 1}, {"a": INT64_MIN - 1}),
        (
            {"a": 1, "b": INT64_MIN - 1, "c": INT64_MAX + 1},
            {"a": 1},
            {"b": INT64_MIN - 1, "c": INT64_MAX + 1},
        ),
        # Some sum wide: every key is judged, and the exact bounds still fit.
        (
            {"w": INT64_MAX + 1, "lo": INT64_MIN, "hi": INT64_MAX},
            {"lo": INT64_MIN, "hi": INT64_MAX},
            {"w": INT64_MAX + 1},
        ),
    ],
)
def test_split_wide_at_the_exact_bounds(
    sums: dict[str, int], fits: dict[str, int], wide: dict[str, int]
) -> None:
    keys, deltas, got_wide = split_wide(sums)
    assert dict(zip(keys, deltas, strict=True)) == fits
    assert keys == [k for k in sums if k in fits], "the order of the sums is kept"
    assert got_wide == wide


# --- unkeyed increments and backpressure ----------------------------------------------------


def test_add_sums_per_key() -> None:
    agg, _ = make()
    agg.add("a", 1)
    agg.add("a", 2)
    agg.add("b", -5)
    assert agg.snapshot() == {"a": 3, "b": -5}
    assert agg.pending_keys == 2
    assert not empty(agg)


def test_add_at_exactly_full_and_one_past() -> None:
    agg, _ = make(limit=2)
    agg.add("a", 1)
    assert not full(agg), "one below the limit"
    agg.add("b", 1)  # exactly the limit: taken
    assert full(agg)
    with pytest.raises(BackpressureError) as refused:
        agg.add("c", 1)  # one past: refused
    assert refused.value.retry_after == 1
    assert refused.value.headers["Retry-After"] == "1"
    agg.add("a", 5)  # a pending key still takes more
    assert agg.snapshot() == {"a": 6, "b": 1}


def test_add_many_at_exactly_full_and_one_past() -> None:
    agg, _ = make(limit=3)
    agg.add("a", 1)
    with pytest.raises(BackpressureError) as refused:
        agg.add_many([("a", 1), ("b", 1), ("c", 1), ("d", 1)])  # 1 + 3 new: one past
    assert refused.value.retry_after == 1
    assert agg.snapshot() == {"a": 1}, "refused whole: nothing added"
    agg.add_many([("a", 1), ("b", 2), ("c", 3), ("b", 4)])  # 1 + 2 new: exactly full
    assert agg.snapshot() == {"a": 2, "b": 6, "c": 3}
    assert full(agg)
    agg.add_many([("a", 1), ("c", 1)])  # no new key: taken when full
    assert agg.snapshot() == {"a": 3, "b": 6, "c": 4}


def test_add_many_into_an_empty_aggregator_starts_the_lag() -> None:
    agg, clock = make()
    agg.add_many([("a", 1)])
    clock.now += 4
    assert agg.persist_lag() == 4


def test_keyed_items_count_against_the_limit_and_unkeyed_keys_against_keyed() -> None:
    agg, _ = make(limit=4)
    agg.add("a", 1)
    agg.add_keyed(keyed("k1", ("a", 1), ("b", 1)))  # 1 + 2 items: 3 of 4
    assert not full(agg)
    assert agg.keyed_items_pending == 2
    with pytest.raises(BackpressureError):
        agg.add_keyed(keyed("k2", ("x", 1), ("y", 1)))  # 3 + 2: one past
    agg.add_keyed(keyed("k3", ("x", 1)))  # 3 + 1: exactly full
    assert full(agg)
    assert agg.pending_keys == 4
    with pytest.raises(BackpressureError):
        agg.add("new", 1)
    with pytest.raises(BackpressureError):
        agg.add_many([("new", 1)])
    with pytest.raises(BackpressureError) as refused:
        agg.add_keyed(keyed("k4", ("z", 1)))
    assert refused.value.retry_after == 1
    assert agg.pending(("open", "k4")) is None


def test_add_many_counts_keyed_items_against_the_limit() -> None:
    agg, _ = make(limit=3)
    agg.add_keyed(keyed("k", ("x", 1), ("y", 1)))
    agg.add_many([("a", 1)])  # 2 + 1: exactly full
    with pytest.raises(BackpressureError):
        agg.add_many([("b", 1)])


def test_the_frozen_batch_frees_the_limit_but_counts_in_pending_keys() -> None:
    agg, _ = make(limit=2)
    agg.add("a", 1)
    agg.add_keyed(keyed("k", ("b", 1)))
    assert full(agg)
    batch = agg.freeze()
    assert batch is not None
    assert not full(agg)
    assert agg.pending_keys == 2, "the batch in flight still counts"
    assert agg.keyed_items_pending == 1
    agg.add("c", 1)
    agg.add_keyed(keyed("k2", ("d", 1)))
    assert full(agg), "full again: the batch in flight is not held against the limit"
    assert agg.pending_keys == 2 + 1 + 1
    assert agg.keyed_items_pending == 1 + 1


# --- freeze, settle ------------------------------------------------------------------------


def test_freeze_swaps_everything_pending_into_one_batch() -> None:
    agg, clock = make()
    agg.add("a", 1)
    one = keyed("k1", ("a", 5))
    two = keyed("k2", ("b", 7), scope="user:1")
    agg.add_keyed(one)
    agg.add_keyed(two)
    clock.now = 130.0
    batch = agg.freeze()
    assert batch is not None
    assert (batch.replica_id, batch.seq, batch.keys, batch.deltas) == ("r", 1, ["a"], [1])
    assert batch.requests == (one, two), "keyed requests in the order they came"
    assert batch.oldest == 100.0
    assert batch.wide == {}
    assert agg.in_flight is batch
    assert agg.freeze() is batch, "the batch in flight is retried unchanged"
    assert agg.keyed_items_pending == 2
    agg.settle(batch)
    assert in_flight(agg) is None
    assert empty(agg)
    assert agg.freeze() is None
    assert agg.pending_keys == 0
    assert agg.keyed_items_pending == 0


def test_a_batch_of_keyed_requests_only() -> None:
    agg, clock = make()
    request = keyed("k", ("a", 1))
    agg.add_keyed(request)
    clock.now = 103.0
    assert agg.persist_lag() == 3.0, "a keyed request alone starts the lag"
    batch = agg.freeze()
    assert batch is not None
    assert (batch.keys, batch.deltas, batch.requests) == ([], [], (request,))
    assert batch.oldest == 100.0
    assert agg.snapshot() == {"a": 1}


def test_sequence_numbers_rise_by_one_per_batch() -> None:
    agg, _ = make()
    seqs = []
    for n in range(3):
        agg.add(f"k{n}", 1)
        batch = agg.freeze()
        assert batch is not None
        seqs.append(batch.seq)
        agg.settle(batch)
    assert seqs == [1, 2, 3]


def test_wide_sums_are_split_out_at_freeze() -> None:
    agg, _ = make()
    agg.add("huge", INT64_MAX)
    agg.add("huge", 1)
    agg.add("small", 1)
    batch = agg.freeze()
    assert batch is not None
    assert (batch.keys, batch.deltas, batch.wide) == (["small"], [1], {"huge": INT64_MAX + 1})
    assert batch.size == 2
    assert agg.pending_keys == 2
    assert agg.snapshot() == {"huge": INT64_MAX + 1, "small": 1}


def test_settle_of_another_batch_keeps_the_one_in_flight() -> None:
    agg, _ = make()
    agg.add_keyed(keyed("k", ("a", 1)))
    batch = agg.freeze()
    assert batch is not None
    agg.settle(Batch("r", batch.seq, [], [], 0.0))  # equal in fields, not the same batch
    assert agg.in_flight is batch
    assert agg.in_flight_holds(("open", "k"))


# --- the keyed path: pending, in flight, take_pending ---------------------------------------


def test_a_keyed_request_is_pending_then_in_flight_then_gone() -> None:
    agg, _ = make()
    request = keyed("k", ("a", 1), ("b", 2))
    ident = request.ident
    assert agg.pending(ident) is None
    agg.add_keyed(request)
    assert agg.pending(ident) is request
    assert not agg.in_flight_holds(ident), "waiting for the next batch, not in flight"
    batch = agg.freeze()
    assert batch is not None
    assert agg.pending(ident) is request, "in flight: still pending"
    assert agg.in_flight_holds(ident)
    assert agg.take_pending(ident) is None, "one in flight is not taken"
    assert agg.pending(ident) is request
    agg.settle(batch)
    assert agg.pending(ident) is None
    assert not agg.in_flight_holds(ident)


def test_take_pending_removes_a_waiting_request_and_frees_its_items() -> None:
    agg, _ = make(limit=3)
    one, two = keyed("k1", ("a", 1), ("b", 1)), keyed("k2", ("c", 1))
    agg.add_keyed(one)
    agg.add_keyed(two)
    assert full(agg)
    assert agg.take_pending(one.ident) is one
    assert agg.pending(one.ident) is None
    assert agg.take_pending(one.ident) is None, "taken once"
    assert not full(agg)
    assert agg.keyed_items_pending == 1
    assert agg.pending_keys == 1
    agg.add_keyed(keyed("k3", ("d", 1), ("e", 1)))  # the freed items are usable: 1 + 2
    batch = agg.freeze()
    assert batch is not None
    assert [r.key for r in batch.keyed] == ["k2", "k3"]


def test_keys_of_two_scopes_do_not_collide() -> None:
    agg, _ = make()
    mine, theirs = keyed("k", ("a", 1), scope="user:1"), keyed("k", ("a", 2), scope="user:2")
    agg.add_keyed(mine)
    agg.add_keyed(theirs)
    assert agg.pending(("user:1", "k")) is mine
    assert agg.pending(("user:2", "k")) is theirs


def test_pending_sees_the_waiting_request_before_the_one_in_flight() -> None:
    agg, _ = make()
    first = keyed("k", ("a", 1))
    agg.add_keyed(first)
    assert agg.freeze() is not None
    again = keyed("k", ("a", 1), durable=True)
    agg.add_keyed(again)  # the accept policy decides when; the aggregator holds both
    assert agg.pending(first.ident) is again
    assert agg.in_flight_holds(first.ident)


# --- recorded keys: remember, expiry, replay --------------------------------------------------


def test_a_remembered_key_is_recorded_until_its_record_time_plus_the_ttl() -> None:
    agg, clock = make(ttl=60.0)
    ident, record = ("open", "k"), Recorded(b"f", durable=True, not_applied=(1,))
    assert agg.recorded(ident) is None
    agg.remember(ident, record, age=10.0)  # recorded 10 s ago: 50 s left
    assert agg.recorded(ident) is record
    clock.now += 49.999
    assert agg.recorded(ident) is record
    clock.now = 150.0  # exactly its record time plus the TTL: forgotten
    assert agg.recorded(ident) is None
    clock.now = 100.0
    assert agg.recorded(ident) is None, "forgotten for good, not hidden"


def test_a_record_older_than_the_ttl_is_forgotten_at_once() -> None:
    agg, clock = make(ttl=60.0)
    agg.remember(("open", "old"), Recorded(b"f"), age=75.0)
    assert agg.recorded(("open", "old")) is None
    agg.remember(("open", "new"), Recorded(b"f"))  # age 0 by default: the whole TTL
    clock.now += 59.9
    assert agg.recorded(("open", "new")) is not None


def test_remembering_a_key_again_does_not_extend_it() -> None:
    agg, clock = make(ttl=60.0)
    ident, first = ("open", "k"), Recorded(b"first")
    agg.remember(ident, first)
    clock.now += 30
    agg.remember(ident, Recorded(b"second"))  # a replay
    assert agg.recorded(ident) is first
    clock.now += 30
    assert agg.recorded(ident) is None


def test_the_oldest_known_keys_go_past_known_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert KNOWN_KEYS == 100_000
    monkeypatch.setattr(aggregator_module, "KNOWN_KEYS", 2)
    agg, _ = make()
    for name in ("a", "b", "c"):
        agg.remember(("open", name), Recorded(name.encode()))
    assert agg.recorded(("open", "a")) is None
    assert agg.recorded(("open", "b")) == Recorded(b"b")
    assert agg.recorded(("open", "c")) == Recorded(b"c")


def test_the_default_ttl_is_an_hour_and_the_clock_monotonic() -> None:
    agg = Aggregator("r", 1)
    agg.remember(("open", "k"), Recorded(b"f"), age=3599.0)
    assert agg.recorded(("open", "k")) is not None
    agg.remember(("open", "gone"), Recorded(b"f"), age=3600.0)
    assert agg.recorded(("open", "gone")) is None


# --- lag and snapshot ----------------------------------------------------------------------


def test_persist_lag_follows_the_oldest_unpersisted_delta() -> None:
    agg, clock = make()
    assert agg.persist_lag() == 0.0
    agg.add("a", 1)
    clock.now = 102.0
    agg.add("b", 1)  # not the oldest
    assert agg.persist_lag() == 2.0
    batch = agg.freeze()
    assert batch is not None
    clock.now = 105.0
    agg.add("c", 1)
    assert agg.persist_lag() == 5.0, "the batch in flight is older"
    agg.settle(batch)
    assert agg.persist_lag() == 0.0
    clock.now = 104.0  # a clock that went back: never negative
    assert agg.persist_lag() == 0.0
    clock.now = 106.0
    assert agg.persist_lag() == 1.0


def test_snapshot_adds_up_pending_in_flight_wide_and_keyed() -> None:
    agg, _ = make()
    agg.add("a", 1)
    agg.add("w", INT64_MAX)
    agg.add("w", INT64_MAX)
    agg.add_keyed(keyed("k1", ("a", 2), ("b", 3)))
    assert agg.freeze() is not None
    agg.add("a", 10)
    agg.add_keyed(keyed("k2", ("b", 100), ("c", 1)))
    assert agg.snapshot() == {"a": 13, "b": 103, "c": 1, "w": 2 * INT64_MAX}


def test_every_refusal_is_reported_once_whoever_refuses() -> None:
    """Each way of being refused for backpressure calls the hook once (the service counts
    increment_backpressure_rejections_total with it), and an admitted request never does."""
    refusals: list[None] = []
    agg = Aggregator("r", max_pending_keys=1, on_refusal=lambda: refusals.append(None))
    agg.add("a", 1)
    agg.add("a", 1)  # a key already pending: admitted
    assert refusals == []
    with pytest.raises(BackpressureError):
        agg.add("b", 1)
    with pytest.raises(BackpressureError):
        agg.add_many([("c", 1)])
    with pytest.raises(BackpressureError):
        agg.add_keyed(Keyed("open", "k", b"f" * 16, (("d", 1),)))
    error = agg.refusal()  # what the durable committer raises when the shared limit is reached
    assert (error.status, error.retry_after) == (503, 1)
    assert len(refusals) == 4
