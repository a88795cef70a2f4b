"""The HTTP surface end to end, in-process against real Postgres and Redis."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp.test_utils import TestClient

from increment_service import keys
from tests.support import JSON


async def test_increment_is_accepted_then_persisted(
    client: TestClient, pg: asyncpg.Connection
) -> None:
    for value in (5, 7, -2):
        response = await client.post("/increment", json={"key": "apples", "value": value})
        assert response.status == 202
        assert await response.read() == b""
    await client.app[keys.WRITE_BEHIND].flush()
    row = await pg.fetchrow("SELECT value, updated_at FROM counters WHERE key = 'apples'")
    assert row is not None
    assert row["value"] == 10
