"""A user of the service's API: signed in, reading a counter back (for stacks and images)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import aiohttp


async def signed_in(base_url: str) -> dict[str, str]:
    """A new user logged in at ``base_url``: the Cookie header of its session (kept in Redis
    only, so it outlives a restart only if Redis kept its data)."""
    from increment_service.sessions import COOKIE_NAME

    account = {"email": f"user-{os.urandom(6).hex()}@example.com", "password": "correct horse"}
    async with aiohttp.ClientSession(base_url=base_url) as session:
        async with session.post("/api/users", json=account) as response:
            assert response.status == 201, await response.text()
        async with session.post("/api/sessions", json=account) as response:
            assert response.status == 201, await response.text()
            return {"Cookie": f"{COOKIE_NAME}={response.cookies[COOKIE_NAME].value}"}


async def counter_via_api(base_url: str, key: str, headers: Mapping[str, str]) -> int:
    """GET /api/counters/{key} with a session (``headers`` from signed_in): the persisted
    value; fails on any answer but 200."""
    async with (
        aiohttp.ClientSession(base_url=base_url, headers=headers) as session,
        session.get(f"/api/counters/{key}") as response,
    ):
        assert response.status == 200, await response.text()
        value: int = (await response.json())["value"]
        return value
