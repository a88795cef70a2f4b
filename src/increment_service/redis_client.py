"""Redis: the client of an app (sessions and their revocation live there)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio
from aiohttp import web

from . import keys


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    assert settings.redis_url is not None  # create_app refuses settings without one
    client = redis.asyncio.Redis.from_url(
        settings.redis_url,
        # Fail fast: a guarded route answers 503 rather than hanging while Redis is away.
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
    )
    app[keys.REDIS] = client
    yield
    await client.aclose()
