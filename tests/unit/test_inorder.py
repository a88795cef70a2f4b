"""The in-order arithmetic alone (writebehind/inorder.py): no server. These are the tests
`tox -e mutation` runs against it; tests/test_answers.py and tests/test_durable.py drive the
same rules through Postgres."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from increment_service.writebehind.inorder import (
    Bounded,
    alone,
    changes_by_counter,
    in_item_order,
    running_bounds,
    settle,
    totals_after,
)
from increment_service.writebehind.items import INT64_MAX, INT64_MIN, Batch, Keyed, Unkeyed


def batch(*requests: Unkeyed | Keyed, sums: dict[str, int] | None = None) -> Batch:
    sums = sums or {}
    return Batch("r", 1, list(sums), list(sums.values()), 0.0, requests=requests)


def test_changes_are_per_request_and_counter_in_request_order() -> None:
    requests = (
        Unkeyed((("a", 1), ("b", 2), ("a", 3))),
        Unkeyed((("b", -1),)),
        Unkeyed((("a", 5),)),
    )
    assert changes_by_counter(requests, frozenset({2, 0})) == {
        "a": [(0, 4, [0, 2]), (2, 5, [0])],
        "b": [(0, 2, [1])],
    }
    assert changes_by_counter(requests, frozenset()) == {}


def test_counters_changed_once_need_no_bound() -> None:
    bounded = running_bounds(batch(Unkeyed((("a", 1),)), Unkeyed((("b", -2),))))
    assert bounded == Bounded(keys=["a", "b"], deltas=[1, -2], shared=[], low=[], high=[])


def test_a_shared_counter_gets_its_lowest_and_highest_running_total_relative_to_the_sum() -> None:
    # Totals from zero: 5, 2, 9, then the summed delta -10: -1. Lowest -1, highest 9.
    bounded = running_bounds(
        batch(
            Unkeyed((("a", 5),)),
            Unkeyed((("a", -3), ("b", 1))),
            Unkeyed((("a", 7),)),
            sums={"a": -10, "c": 4},
        )
    )
    assert bounded is not None
    assert dict(zip(bounded.keys, bounded.deltas, strict=True)) == {"a": -1, "b": 1, "c": 4}
    assert bounded.shared == ["a"]
    assert (bounded.low, bounded.high) == ([-1 - -1], [9 - -1])


def test_the_starting_total_counts_as_a_bound() -> None:
    # Every running total above zero: the lowest total is the one before the batch (0).
    bounded = running_bounds(batch(Unkeyed((("a", 2),)), Unkeyed((("a", 3),))))
    assert bounded is not None
    assert (bounded.shared, bounded.low, bounded.high) == (["a"], [0 - 5], [5 - 5])
    bounded = running_bounds(batch(Unkeyed((("a", -2),)), Unkeyed((("a", -3),))))
    assert bounded is not None
    assert (bounded.low, bounded.high) == ([-5 - -5], [0 - -5])


def test_a_total_from_zero_outside_bigint_goes_in_order() -> None:
    assert running_bounds(batch(Unkeyed((("a", INT64_MAX),)), Unkeyed((("a", 1),)))) is None
    assert running_bounds(batch(Unkeyed((("a", INT64_MIN),)), Unkeyed((("a", -1),)))) is None
    # At the edge exactly: still one sum.
    edge = running_bounds(batch(Unkeyed((("a", INT64_MAX - 1),)), Unkeyed((("a", 1),))))
    assert edge is not None
    assert edge.deltas == [INT64_MAX]
    low = running_bounds(batch(Unkeyed((("a", INT64_MIN + 1),)), Unkeyed((("a", -1),))))
    assert low is not None
    assert low.deltas == [INT64_MIN]
    # Back inside at the end does not help: a running total left bigint on the way.
    back = (Unkeyed((("a", INT64_MAX),)), Unkeyed((("a", 1),)), Unkeyed((("a", -5),)))
    assert running_bounds(batch(*back)) is None
    # Within one request the items are one change: its net total is what must fit.
    net = running_bounds(batch(Unkeyed((("a", INT64_MAX),)), Unkeyed((("a", 1), ("a", -5)))))
    assert net == Bounded(["a"], [INT64_MAX - 4], ["a"], [-(INT64_MAX - 4)], [4])


def test_keyed_requests_and_wide_sums_go_in_order() -> None:
    keyed = Keyed("open", "k", b"fp", (("a", 1),))
    assert running_bounds(batch(Unkeyed((("a", 1),)), keyed)) is None
    wide = Batch("r", 1, [], [], 0.0, wide={"a": INT64_MAX + 1}, requests=(Unkeyed((("b", 1),)),))
    assert running_bounds(wide) is None


def test_settle_refuses_the_change_that_leaves_bigint_and_applies_the_next() -> None:
    changes = {"a": [(0, 5, [0]), (1, 10, [0, 1]), (2, -20, [3])], "b": [(0, 1, [1])]}
    rejected: dict[int, set[int]] = {}
    summed: list[str] = []
    changed = settle(
        ["a", "b"], {"a": INT64_MAX - 7, "b": 0}, changes, {"a": 3, "b": 2}, rejected, summed
    )
    # a: +5 fits, +10 does not (request 1 refused), -20 fits, then the sum +3 fits.
    assert changed == {"a": INT64_MAX - 7 + 5 - 20 + 3, "b": 3}
    assert rejected == {1: {0, 1}}
    assert summed == []


def test_settle_refuses_the_summed_deltas_by_key_and_reports_only_what_moved() -> None:
    rejected: dict[int, set[int]] = {}
    summed: list[str] = []
    changed = settle(
        ["a", "b"],
        {"a": INT64_MIN + 1, "b": 7},
        {"a": [(0, -2, [0])]},
        {"a": -1, "b": 0},
        rejected,
        summed,
    )
    # a: -2 leaves bigint (refused), then -1 reaches INT64_MIN exactly; b: +0 fits.
    assert changed == {"a": INT64_MIN, "b": 7}
    assert rejected == {0: {0}}
    rejected, summed = {}, []
    changed = settle(["a"], {"a": INT64_MAX}, {}, {"a": 1}, rejected, summed)
    assert (changed, rejected, summed) == ({}, {}, ["a"])


deltas = st.integers(min_value=-(2**62), max_value=2**62)


@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from("abc"), deltas), min_size=1, max_size=3), max_size=6
    ),
    st.dictionaries(st.sampled_from("abc"), st.integers(INT64_MIN, INT64_MAX)),
)
def test_one_sum_within_the_bounds_is_exactly_the_in_order_outcome(
    items: list[list[tuple[str, int]]], start: dict[str, int]
) -> None:
    """Where the statement's check passes (every running total fits), settling in order
    refuses nothing and reaches the same totals; where it fails, settling refuses something."""
    requests = tuple(Unkeyed(tuple(request)) for request in items)
    bounded = running_bounds(batch(*requests))
    if bounded is None:
        return
    new = {k: start.get(k, 0) + d for k, d in zip(bounded.keys, bounded.deltas, strict=True)}
    fits = all(INT64_MIN <= v <= INT64_MAX for v in new.values()) and all(
        INT64_MIN <= new[k] + lo <= INT64_MAX and INT64_MIN <= new[k] + hi <= INT64_MAX
        for k, lo, hi in zip(bounded.shared, bounded.low, bounded.high, strict=True)
    )
    changes = changes_by_counter(requests, frozenset(range(len(requests))))
    rejected: dict[int, set[int]] = {}
    summed: list[str] = []
    keys = sorted(changes)
    changed = settle(keys, {k: start.get(k, 0) for k in keys}, changes, {}, rejected, summed)
    assert fits == (not rejected)
    if fits:
        assert changed == {k: new[k] for k in keys}


def test_bounds_cover_every_prefix() -> None:
    # Exhaustive over small sequences: the bounds are exactly the extreme running totals.
    for steps in itertools.product((-3, 0, 4), repeat=3):
        bounded = running_bounds(batch(*(Unkeyed((("a", s),)) for s in steps)))
        assert bounded is not None
        totals = list(itertools.accumulate(steps, initial=0))
        assert bounded.deltas == [totals[-1]]
        assert bounded.low == [min(totals) - totals[-1]]
        assert bounded.high == [max(totals) - totals[-1]]


def test_totals_are_worked_back_from_the_final_totals() -> None:
    requests = (
        Unkeyed((("a", 2), ("b", 1), ("a", 1))),
        Unkeyed((("a", 100),)),
        Unkeyed((("b", 5), ("a", -3))),
    )
    changes = changes_by_counter(requests, frozenset({0, 1, 2}))
    final = {"a": 110, "b": 6}
    assert totals_after(changes, final, {}, {}, {0, 2}) == {
        0: {"a": 13, "b": 1},
        2: {"b": 6, "a": 110},
    }
    # Summed deltas came last: taken off first. A request that asked nothing gets nothing.
    assert totals_after(changes, {"a": 117, "b": 6}, {}, {"a": 7}, {1}) == {1: {"a": 113}}
    assert totals_after(changes, final, {}, {}, set()) == {}


def test_a_refused_change_has_no_total_and_moved_nothing() -> None:
    requests = (Unkeyed((("c", 10),)), Unkeyed((("c", -10), ("d", 1))), Unkeyed((("c", 3),)))
    changes = changes_by_counter(requests, frozenset({0, 1, 2}))
    after = totals_after(changes, {"c": 93, "d": 1}, {0: {0}}, {}, {0, 1, 2})
    assert after == {0: {}, 1: {"c": 90, "d": 1}, 2: {"c": 93}}
    # Only the refused change's own items count: request 1's item 1 is on another counter.
    after = totals_after(changes, {"c": 103, "d": 0}, {1: {1}}, {}, {1})
    assert after == {1: {"c": 100}}
    # A counter missing from the final totals (never created: every change to it refused).
    assert totals_after(changes, {"c": 93}, {1: {1}}, {}, {1}) == {1: {"c": 90}}


def test_totals_follow_the_order_the_items_first_name_their_counters() -> None:
    items = (("b", 1), ("a", 2), ("b", 3), ("c", 1))
    assert in_item_order(items, {"a": 5, "b": 9, "c": 1}) == (("b", 9), ("a", 5), ("c", 1))
    assert in_item_order(items, {"a": 5}) == (("a", 5),)


def test_alone_is_plain_requests_sharing_no_counter_and_asking_no_totals() -> None:
    assert alone(batch(Unkeyed((("a", 1), ("a", 2))), Unkeyed((("b", 1),))))
    assert not alone(batch(Unkeyed((("a", 1),)), Unkeyed((("b", 1), ("a", 1)))))
    assert not alone(batch(Unkeyed((("a", 1),)), sums={"z": 1}))
    assert not alone(batch(Keyed("open", "k", b"fp", (("a", 1),))))
    assert not alone(batch(Unkeyed((("a", 1),), representation=True)))
    wide = Batch("r", 1, [], [], 0.0, wide={"w": INT64_MAX + 1}, requests=(Unkeyed((("b", 1),)),))
    assert not alone(wide)


def test_settle_takes_a_change_that_reaches_either_edge_exactly() -> None:
    changes = {"up": [(0, 5, [0])], "down": [(0, -5, [1])], "sum": [(0, 1, [2])]}
    rejected: dict[int, set[int]] = {}
    summed: list[str] = []
    start = {"up": INT64_MAX - 5, "down": INT64_MIN + 5, "sum": INT64_MAX - 3}
    changed = settle(["up", "down", "sum"], start, changes, {"sum": 2}, rejected, summed)
    assert changed == {"up": INT64_MAX, "down": INT64_MIN, "sum": INT64_MAX}
    assert (rejected, summed) == ({}, [])


def test_totals_go_on_past_a_missing_counter_and_a_refused_change() -> None:
    requests = (Unkeyed((("gone", 1), ("c", 1))), Unkeyed((("c", 5),)), Unkeyed((("c", 2),)))
    changes = changes_by_counter(requests, frozenset({0, 1, 2}))
    # "gone" comes first and is not among the final totals; request 1's change was refused.
    after = totals_after(changes, {"c": 13}, {0: {0}, 1: {0}}, {}, {0, 2})
    assert after == {0: {"c": 11}, 2: {"c": 13}}


def test_alone_remembers_every_counter_seen_so_far() -> None:
    assert not alone(batch(Unkeyed((("a", 1),)), Unkeyed((("b", 1),)), Unkeyed((("a", 1),))))
