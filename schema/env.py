"""Alembic environment: migrate over asyncpg, one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from increment_service.tables import metadata

config = context.config


def _upgrade(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


#: How often a replica waiting for another's migrations asks for the lock again.
LOCK_POLL_SECONDS = 0.2


async def _lock(connection: AsyncConnection, lock_key: int) -> None:
    """Take the migration lock, asking again until it is free, never waiting in a statement:
    a replica blocked in pg_advisory_lock() holds a snapshot the whole time, and a
    CREATE INDEX CONCURRENTLY of the lock's holder waits for every older snapshot to end, so
    the two would wait for each other (Postgres reports a deadlock)."""
    while True:
        taken = await connection.scalar(sa.select(sa.func.pg_try_advisory_lock(lock_key)))
        await connection.commit()  # no transaction, and so no snapshot, while waiting
        if taken:
            return
        await asyncio.sleep(LOCK_POLL_SECONDS)


async def _run() -> None:
    url = str(config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url"))
    lock_key = int(config.attributes.get("lock_key", 0))
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            # A session-level lock: held across Alembic's transactions, released on disconnect
            # even if this process dies half-way.
            await _lock(connection, lock_key)
            await connection.run_sync(_upgrade)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (SQL script) migrations are not supported: run `increment-service migrate`"
    )
asyncio.run(_run())
