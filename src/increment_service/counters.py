"""Reading persisted counters: one, many by name, a page by prefix. Storage functions take a
connection, not the app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import db
from .db import Connection


def _counter(row: Any) -> dict[str, Any]:
    return {
        "key": row["key"],
        "value": row["value"],
        "updatedAt": row["updated_at"].isoformat(),
    }


async def get(conn: Connection, key: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT key, value, updated_at FROM counters WHERE key = $1",
        key,
        timeout=db.REQUEST_TIMEOUT_SECONDS,
    )
    return None if row is None else _counter(row)


async def get_many(conn: Connection, keys: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The counters of ``keys`` that exist and the keys that do not, each once, in the order
    of their first mention in ``keys``."""
    ordered = list(dict.fromkeys(keys))
    rows = await conn.fetch(
        "SELECT key, value, updated_at FROM counters WHERE key = ANY($1::text[])",
        ordered,
        timeout=db.REQUEST_TIMEOUT_SECONDS,
    )
    found = {row["key"]: _counter(row) for row in rows}
    return (
        [found[key] for key in ordered if key in found],
        [key for key in ordered if key not in found],
    )


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, in code point order
    (which is UTF-8's byte order, the "C" collation's); None when nothing is above them all
    (an empty prefix, or one of U+10FFFF only).

    Its last character that can grow grows by one (surrogates, which text cannot hold, are
    skipped), and what followed it is dropped: ``ab`` -> ``ac``, ``a\\U0010ffff`` -> ``b``."""
    chars = prefix
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            following = 0xE000 if last + 1 == 0xD800 else last + 1
            return chars[:-1] + chr(following)
        chars = chars[:-1]
    return None


async def page(
    conn: Connection, prefix: str, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` counters whose key starts with ``prefix`` and sorts after ``after``, in
    byte order, and the key to pass as ``after`` for the next page (None: this was the last).

    A range on the ``(key COLLATE "C")`` index (migration 0007), not ``LIKE``: the prefix is
    compared, never interpreted, so ``%``, ``_`` and ``\\`` in it are plain characters."""
    # Byte order and code point order agree on UTF-8, so Python picks the tighter lower bound.
    if after is not None and after >= prefix:
        conditions, args = ['key COLLATE "C" > $1'], [after]
    else:
        conditions, args = ['key COLLATE "C" >= $1'], [prefix]
    end = prefix_end(prefix)
    if end is not None:
        conditions.append(f'key COLLATE "C" < ${len(args) + 1}')
        args.append(end)
    where = " AND ".join(conditions)
    # Four shapes of statement in all (asyncpg prepares each once per connection). One row
    # past the page says whether another follows: the last page says so itself, and never
    # sends the client for an empty one.
    sql = f'SELECT key, value, updated_at FROM counters WHERE {where} ORDER BY key COLLATE "C"'  # noqa: S608 -- fixed fragments; every value is a parameter
    rows = await conn.fetch(
        f"{sql} LIMIT ${len(args) + 1}", *args, limit + 1, timeout=db.REQUEST_TIMEOUT_SECONDS
    )
    counters = [_counter(row) for row in rows[:limit]]
    more = len(rows) > limit
    return counters, counters[-1]["key"] if more else None
