"""In order: a batch's requests applied as if each had committed alone, in order, then the
summed deltas. Pure arithmetic over a batch (store.py runs the statements).

A counter that several of a batch's requests change is the only place where order matters:
each change is applied, or refused if the running total would leave bigint, on the total the
changes before it left. When every running total is known to fit, the order cannot change the
outcome, and the counter can be applied as one sum; ``running_bounds`` says what to check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .items import INT64_MAX, INT64_MIN, Batch, Item, Keyed, Request

#: Per counter key, the changes of a batch's applied requests, in order: (request, its net
#: delta to the counter, the indexes of its items on it).
Changes = dict[str, list[tuple[int, int, list[int]]]]


def changes_by_counter(requests: Sequence[Request], applied: frozenset[int]) -> Changes:
    """One pass over the items of the applied requests."""
    changes: Changes = {}
    for n in sorted(applied):
        mine: dict[str, tuple[int, list[int]]] = {}
        for i, (key, value) in enumerate(requests[n].items):
            delta, items = mine.get(key, (0, []))
            items.append(i)
            mine[key] = (delta + value, items)
        for key, (delta, items) in mine.items():
            changes.setdefault(key, []).append((n, delta, items))
    return changes


@dataclasses.dataclass(frozen=True, slots=True)
class Bounded:
    """A batch of unkeyed requests as one summed statement can apply it.

    ``keys``/``deltas``: each counter's net change (requests and summed deltas). For each
    counter more than one change touches, ``low``/``high`` are the lowest and highest of its
    running totals, relative to its NEW value (the stored total after the sum): every running
    total fits a bigint exactly when ``new + low`` and ``new + high`` do. A counter changed
    once needs no bound: its one total is the sum, which the UPSERT itself checks."""

    keys: list[str]
    deltas: list[int]
    shared: list[str]
    low: list[int]
    high: list[int]


def running_bounds(batch: Batch) -> Bounded | None:
    """``batch`` as a summed statement with bounds, or None when it cannot be: it has keyed
    requests (claims decide what applies) or wide sums, or some running total, counted from
    zero, leaves bigint (then only the in-order path can say which change is refused)."""
    if batch.wide or any(isinstance(r, Keyed) for r in batch.requests):
        return None
    steps = changes_by_counter(batch.requests, frozenset(range(len(batch.requests))))
    totals: dict[str, int] = {}
    lows: dict[str, int] = {}
    highs: dict[str, int] = {}
    count: dict[str, int] = {}
    changes = [(key, delta) for key, each in steps.items() for _, delta, _ in each]
    for key, delta in [*changes, *zip(batch.keys, batch.deltas, strict=True)]:
        total = totals[key] = totals.get(key, 0) + delta
        lows[key] = min(lows.get(key, 0), total)
        highs[key] = max(highs.get(key, 0), total)
        count[key] = count.get(key, 0) + 1
    if min(lows.values(), default=0) < INT64_MIN or max(highs.values(), default=0) > INT64_MAX:
        return None
    shared = [key for key, n in count.items() if n > 1]
    return Bounded(
        keys=list(totals),
        deltas=list(totals.values()),
        shared=shared,
        low=[lows[key] - totals[key] for key in shared],
        high=[highs[key] - totals[key] for key in shared],
    )


def settle(
    shared: Sequence[str],
    values: dict[str, int],
    changes: Changes,
    sums: dict[str, int],
    rejected_items: dict[int, set[int]],
    summed_rejected: list[str],
) -> dict[str, int]:
    """The locked counters ``shared`` (their totals in ``values``) moved by each request's
    change in order, as if it had committed alone, then by the summed deltas (``sums``); a
    change that would leave bigint is refused (into ``rejected_items`` by request,
    ``summed_rejected`` by key). Returns the new totals of the counters that moved."""
    changed: dict[str, int] = {}
    for key in shared:
        value, moved = values[key], False
        for n, delta, items in changes.get(key, ()):
            if INT64_MIN <= value + delta <= INT64_MAX:
                value, moved = value + delta, True
            else:
                rejected_items.setdefault(n, set()).update(items)
        if key in sums:
            if INT64_MIN <= value + sums[key] <= INT64_MAX:
                value, moved = value + sums[key], True
            else:
                summed_rejected.append(key)
        if moved:
            changed[key] = value
    return changed


def totals_after(
    changes: Changes,
    final: dict[str, int],
    refused: dict[int, set[int]],
    sums: dict[str, int],
    wanted: set[int],
) -> dict[int, dict[str, int]]:
    """For each request in ``wanted``, the running total of each counter it changed right
    after its change, worked back from the counters' ``final`` totals: the applied summed
    deltas (``sums``, which came last) taken off, then each applied change from the last.
    A change whose items are in ``refused`` moved nothing and has no total."""
    after: dict[int, dict[str, int]] = {n: {} for n in wanted}
    for key, steps in changes.items():
        if key not in final:
            continue  # every change to it refused, and the counter never existed
        value = final[key] - sums.get(key, 0)
        for n, delta, items in reversed(steps):
            if items[0] in refused.get(n, ()):
                continue
            if n in wanted:
                after[n][key] = value
            value -= delta
    return after


def in_item_order(items: Sequence[Item], totals: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """A request's totals in the order its items first name their counters."""
    return tuple((key, totals[key]) for key in dict.fromkeys(k for k, _ in items) if key in totals)


def alone(batch: Batch) -> bool:
    """Whether the batch's requests have no key, no summed deltas beside them, and no counter
    that two of them change (a durable group of plain requests, almost always)."""
    if batch.keys or batch.wide:
        return False
    if any(r.representation for r in batch.requests):
        return False  # its totals are read in its transaction, which holds the rows' locks
    seen: set[str] = set()
    for request in batch.requests:
        if isinstance(request, Keyed):
            return False
        mine = {key for key, _ in request.items}
        if not seen.isdisjoint(mine):
            return False
        seen |= mine
    return True
