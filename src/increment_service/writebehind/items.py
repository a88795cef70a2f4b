"""What the write-behind holds and sends: keyed requests, batches, and the int64 split."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: Joins the keys of a batch into one string. Keys never hold control characters (validation),
#: so this one cannot be part of a key.
KEY_SEPARATOR = "\x1f"

Ident = tuple[str, str]  # (scope, idempotency key)
Item = tuple[str, int]  # (counter key, value)


@dataclasses.dataclass(frozen=True, slots=True)
class Keyed:
    """A request with an Idempotency-Key: applied once (each of its items, or its refusal,
    as if it had committed alone), or not at all."""

    scope: str  # whose keys these are: a user, or the open routes (accept.scope_of)
    key: str
    fingerprint: bytes  # the route kind and the items (accept.fingerprint)
    items: tuple[Item, ...]
    #: Its first answer is a durable one (the key's record says so to every retry); False:
    #: it was answered 202 (even when a durable retry later moves it into a durable group).
    durable: bool = False
    #: ``Prefer: durable, return=representation``: its answer names each counter's running
    #: total right after it (kept in its key's record, for every replay).
    representation: bool = False

    @property
    def ident(self) -> Ident:
        return (self.scope, self.key)


@dataclasses.dataclass(frozen=True, slots=True)
class Unkeyed:
    """A durable request without an Idempotency-Key: applied as if it had committed alone."""

    items: tuple[Item, ...]
    representation: bool = False  # as Keyed.representation


Request = Keyed | Unkeyed


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """``return=representation``: each counter a request changed (in the order its items
    first name them; not those whose change was refused), with its running total right after
    the request in its commit, and that commit's time (every such counter's ``updated_at``)."""

    counters: tuple[tuple[str, int], ...]
    at: datetime.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """A key's record: which body owns it, and what its first answer said."""

    fingerprint: bytes
    durable: bool = False  # the first answer was a durable 204/200; else a 202
    not_applied: tuple[int, ...] = ()  # the indexes of the items that were not applied
    totals: Totals | None = None  # its totals, if its first answer was a representation


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """What one statement applies. The timer's batches carry the summed deltas of the
    written-behind increments (``keys``/``deltas``/``wide``) and the keyed requests; a durable
    group carries its requests only, never summed together. ``requests`` are in commit order:
    each is applied or refused as if it had committed alone, in that order, and the summed
    deltas come last."""

    replica_id: str
    seq: int
    keys: list[str]  # in no particular order: the statement sorts them
    deltas: list[int]
    oldest: float  # monotonic time of the batch's oldest delta
    # Keys whose delta summed over the interval does not fit a bigint (thousands of huge
    # increments to one key): sent as numeric, applied if the stored total still fits.
    wide: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: tuple[Request, ...] = ()

    @property
    def keyed(self) -> tuple[Keyed, ...]:
        return tuple(r for r in self.requests if isinstance(r, Keyed))

    @property
    def size(self) -> int:
        """Keys and request items: what the batch holds against MAX_PENDING_KEYS."""
        return len(self.keys) + len(self.wide) + sum(len(r.items) for r in self.requests)


def split_wide(sums: Mapping[str, int]) -> tuple[list[str], list[int], dict[str, int]]:
    """Per-key sums as the statements take them: the keys and deltas that fit a bigint, and
    the (rare) wide ones that do not."""
    keys, deltas = list(sums), list(sums.values())
    # min and max run in C: the per-key test below only when some sum left bigint.
    if not deltas or (min(deltas) >= INT64_MIN and max(deltas) <= INT64_MAX):
        return keys, deltas, {}
    wide = {k: d for k, d in sums.items() if not INT64_MIN <= d <= INT64_MAX}
    keys = [k for k in keys if k not in wide]
    return keys, [sums[k] for k in keys], wide
