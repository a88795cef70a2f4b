"""Problem details (RFC 9457) as the service answers them: status, media type and members."""

from __future__ import annotations

from typing import Any

import aiohttp

PROBLEM = "application/problem+json"


async def assert_problem(
    response: aiohttp.ClientResponse, status: int, pointers: list[str] | None = None
) -> dict[str, Any]:
    """``response`` is a problem+json of ``status`` with a string type, title and detail; with
    ``pointers``, its ``errors`` name exactly those JSON pointers, each with a detail. The body."""
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert body["status"] == status
    assert isinstance(body["type"], str)
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    if pointers is not None:
        assert sorted(e["pointer"] for e in body["errors"]) == sorted(pointers)
        assert all(isinstance(e["detail"], str) and e["detail"] for e in body["errors"])
    return body


async def problem_type(response: aiohttp.ClientResponse) -> str:
    """The last part of a problem's type (``urn:...:problem:not-committed``: ``not-committed``)."""
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    return str(body["type"]).rsplit(":", 1)[-1]
