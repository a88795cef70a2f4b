"""A scripted HTTP server for the client's tests (real sockets, real aiohttp): each attempt is
answered with the next step of a script (then 202), and what every attempt sent is recorded.
``serving()`` starts such servers and closes them (the ``serve`` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from increment_service.client import IncrementClient
from increment_service.errors import problem_type

Step = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(code: int, headers: dict[str, str] | None = None, slug: str = "x") -> Step:
    """A problem+json answer, as the service (or a proxy) gives it."""

    async def step(request: web.Request) -> web.StreamResponse:
        if code < 400:
            return web.Response(status=code, headers=headers)
        problem = {"type": problem_type(slug), "title": "t", "status": code, "detail": "said so"}
        return web.json_response(
            problem, status=code, headers=headers, content_type="application/problem+json"
        )

    return step


def reset() -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()  # the connection dies with no answer at all
        raise asyncio.CancelledError

    return step


def slow(seconds: float) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=202)

    return step


class Scripted:
    """Answers each attempt with the next step of its script (then 202), and records what
    every attempt sent and when it came."""

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(
            {
                "at": time.monotonic(),
                "path": request.path,
                "key": request.headers.get("Idempotency-Key"),
                "prefer": request.headers.get("Prefer"),
                "authorization": request.headers.get("Authorization"),
                "content_type": request.content_type,
                "body": json.loads(raw) if raw else None,
                "raw": raw,
                "method": request.method,
                "query": list(request.query.items()),
            }
        )
        step = self.script.pop(0) if self.script else answer(202)
        return await step(request)

    def keys(self) -> set[str | None]:
        return {seen["key"] for seen in self.seen}

    def gaps(self) -> list[float]:
        return [b["at"] - a["at"] for a, b in zip(self.seen, self.seen[1:], strict=False)]


Serve = Callable[[list[Step]], Awaitable[tuple[str, Scripted]]]


@asynccontextmanager
async def serving() -> AsyncIterator[Serve]:
    """Start scripted servers on demand (on the /increment, /increments, /api/increment and
    /api/increments routes, and the reads': POST /api/counters/lookup, GET /api/counters); all
    are closed at the end."""
    servers: list[TestServer] = []

    async def start(script: list[Step]) -> tuple[str, Scripted]:
        scripted = Scripted(script)
        app = web.Application()
        app.router.add_post("/increment", scripted.handle)
        app.router.add_post("/increments", scripted.handle)
        app.router.add_post("/api/increment", scripted.handle)
        app.router.add_post("/api/increments", scripted.handle)
        app.router.add_post("/api/counters/lookup", scripted.handle)
        app.router.add_get("/api/counters", scripted.handle)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), scripted

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


def quick(url: str, **kw: Any) -> IncrementClient:
    """A client with short timeouts and a seeded jitter, for scripted servers."""
    options: dict[str, Any] = {
        "deadline": 5.0,
        "attempt_timeout": 0.5,
        "first_backoff": 0.01,
        "max_backoff": 0.05,
        "rng": random.Random(1),
    }
    return IncrementClient(url, **{**options, **kw})
