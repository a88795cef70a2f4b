"""Postgres: the connection pool of an app, and the migrations applied at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .errors import ServiceUnavailable

log = logging.getLogger(__name__)

#: What storage functions take: a connection of their own or one lent by the pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

#: How long a request waits for a pooled connection, and then for its statement, before it
#: answers 503 (the pool's command_timeout, 10 s, is for the write-behind).
REQUEST_TIMEOUT_SECONDS = 5.0

#: The server-side limit on any statement of the service (milliseconds).
STATEMENT_TIMEOUT_MS = 30_000

#: Postgres cannot answer now (down, starting, restarting, overloaded, too slow): the request
#: is fine and may be retried, so these are a 503, never a 500.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection is closed" mid-query
    asyncpg.OperatorInterventionError,  # shutting down, starting up, statement cancelled
    asyncpg.InsufficientResourcesError,  # too many connections
)

#: pg_advisory_lock key held while migrating: replicas starting together migrate one by one.
MIGRATION_LOCK_KEY = 0x1AC2E3E47


def schema_dir() -> Path:
    """The Alembic scripts: `schema/` in the repository, installed as increment_service.schema."""
    return Path(str(importlib.resources.files("increment_service.schema")))


def sqlalchemy_url(database_url: str) -> str:
    _, _, rest = database_url.partition("://")
    return f"postgresql+asyncpg://{rest}"


def migrate(database_url: str) -> None:
    """Upgrade the schema to the newest revision (blocking: run it before the event loop)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(schema_dir()))
    config.attributes["database_url"] = sqlalchemy_url(database_url)
    config.attributes["lock_key"] = MIGRATION_LOCK_KEY
    command.upgrade(config, "head")


def migrate_with_retry(database_url: str, timeout: float = 60.0) -> None:
    """Postgres may still be starting next to us (compose, k8s): retry for a while."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            migrate(database_url)
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "postgres not reachable yet, retrying migrations", extra={"error": str(exc)}
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            return


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, what: str) -> AsyncIterator[Connection]:
    """A pooled connection for a request; an outage while acquiring or using it is a 503."""
    try:
        async with pool.acquire(timeout=REQUEST_TIMEOUT_SECONDS) as conn:
            yield conn
    except OUTAGE_ERRORS as exc:
        raise ServiceUnavailable(
            f"the {what} is unavailable; retry later", headers={"Retry-After": "1"}
        ) from exc


async def create_pool(database_url: str) -> asyncpg.Pool:
    """The app's pool. min_size=0: a replica starts (and buffers increments) even while
    Postgres is down."""
    return await asyncpg.create_pool(
        database_url,
        min_size=0,
        max_size=4,
        command_timeout=10,
        # Enforced by the server, even when the client is gone: no statement of the service
        # outlives this (the idempotency grace period counts on it, see writebehind/store.py).
        server_settings={
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
            # Short statements, run over and over: JIT compiling them costs more than it saves
            # (the keyed batch statement, estimated high, spent 1.8 s of 2 s compiling).
            "jit": "off",
        },
    )


async def close_pool(pool: asyncpg.Pool, within: float = 5.0) -> None:
    """Close gracefully if that takes at most ``within`` seconds (and 5 s), else cut the
    connections (``pool.close`` terminates them when its wait is cancelled)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pool.close(), timeout=min(within, 5.0))
    pool.terminate()  # nothing left to do after a graceful close
