"""Redis: the client of an app (sessions, their revocation and the throttles live there), and
how a request handler calls it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .errors import ServiceUnavailable

T = TypeVar("T")

#: A request waits at most this long for Redis, then answers 503.
REDIS_TIMEOUT_SECONDS = 2.0


def create_client(redis_url: str) -> redis.asyncio.Redis:
    """The app's client (it connects on first use)."""
    return redis.asyncio.Redis.from_url(
        redis_url,
        # Fail fast: a guarded route answers 503 rather than hanging while Redis is away.
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Redis unreachable or slow: a session or a throttle cannot be checked, so fail closed
    with a 503."""
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise unavailable() from exc


def unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the session store is unavailable; retry later", headers={"Retry-After": "1"}
    )


async def redis_call(client: redis.asyncio.Redis, call: Callable[[], Awaitable[T]]) -> T:
    """Redis work done while a client waits: bounded in time, a 503 when Redis fails.

    After a Redis restart every idle pooled connection is dead, and the pool (no retries, see
    create_client) would hand them out one by one, failing one request each. On a connection error
    the idle connections are dropped and ``call`` runs once more on a fresh one. Every ``call``
    is safe to repeat: reads, SET XX, DEL, PUBLISH; a repeated throttle update leaves a count
    off by one at most.
    """
    with redis_errors():
        async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
            try:
                return await call()
            except RedisConnectionError:
                await client.connection_pool.disconnect(inuse_connections=False)
                return await call()
