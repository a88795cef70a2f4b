"""A user of the API with a session and tokens, in-process (the ``client`` of pytest-aiohttp)."""

from __future__ import annotations

import uuid
from typing import Any

from increment_service.sessions import COOKIE_NAME
from tests.support.inprocess import Client

PASSWORD = "correct horse battery"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signed_up(client: Client) -> tuple[str, dict[str, str]]:
    """A new user, logged in: its id and the Cookie header of its session."""
    account = {"email": f"user-{uuid.uuid4().hex[:12]}@example.com", "password": PASSWORD}
    created = await client.post("/api/users", json=account)
    assert created.status == 201, await created.text()
    login = await client.post("/api/sessions", json=account)
    assert login.status == 201, await login.text()
    user_id = str((await login.json())["userId"])
    return user_id, {"Cookie": f"{COOKIE_NAME}={login.cookies[COOKIE_NAME].value}"}


async def made(
    client: Client, cookie: dict[str, str], scopes: list[str] | None = None, **body: Any
) -> dict[str, Any]:
    """POST /api/tokens with the session of ``cookie``: the 201's body."""
    payload = {"name": "ci", "scopes": scopes or ["increment", "read"], **body}
    response = await client.post("/api/tokens", json=payload, headers=cookie)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created
