"""Alembic environment: migrate over asyncpg, one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from increment_service.tables import metadata

config = context.config


def _upgrade(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run() -> None:
    url = str(config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url"))
    lock_key = int(config.attributes.get("lock_key", 0))
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            # A session-level lock: held across Alembic's transaction, released on disconnect
            # even if this process dies half-way.
            await connection.execute(sa.select(sa.func.pg_advisory_lock(lock_key)))
            await connection.commit()
            await connection.run_sync(_upgrade)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (SQL script) migrations are not supported: run `increment-service migrate`"
    )
asyncio.run(_run())
