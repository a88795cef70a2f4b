"""Reading persisted counters. Storage functions take a connection, not the app."""

from __future__ import annotations

from typing import Any

import orjson

from . import db
from .db import Connection


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def get(conn: Connection, key: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT key, value, updated_at FROM counters WHERE key = $1",
        key,
        timeout=db.REQUEST_TIMEOUT_SECONDS,
    )
    if row is None:
        return None
    return {
        "key": row["key"],
        "value": row["value"],
        "updatedAt": row["updated_at"].isoformat(),
    }
