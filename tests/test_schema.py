"""The migrations build exactly the schema the SQLAlchemy metadata describes, both ways."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from increment_service.db import MIGRATION_LOCK_KEY, migrate, schema_dir, sqlalchemy_url
from increment_service.tables import metadata
from tests.conftest import Servers, _admin
from tests.support.postgres import with_database


@pytest.fixture
def scratch_url(servers: Servers) -> Iterator[str]:
    name = f"increment_schema_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(servers.postgres_url, f'CREATE DATABASE "{name}"'))
    yield with_database(servers.postgres_url, name)
    asyncio.run(_admin(servers.postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(schema_dir()))
    config.attributes["database_url"] = sqlalchemy_url(url)
    config.attributes["lock_key"] = MIGRATION_LOCK_KEY
    return config


async def _diff(url: str) -> list[object]:
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def _fillfactor(url: str) -> list[str] | None:
    conn = await asyncpg.connect(url)
    try:
        options: list[str] | None = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE relname = 'counters'"
        )
    finally:
        await conn.close()
    return options


def test_migrations_match_the_metadata_and_downgrade_cleanly(scratch_url: str) -> None:
    migrate(scratch_url)
    assert asyncio.run(_diff(scratch_url)) == []
    migrate(scratch_url)  # applying again is a no-op
    command.downgrade(_config(scratch_url), "base")
    assert asyncio.run(_tables(scratch_url)) == {"alembic_version"}
    migrate(scratch_url)
    assert {"counters", "users", "applied_batches"} <= asyncio.run(_tables(scratch_url))
    assert asyncio.run(_fillfactor(scratch_url)) == ["fillfactor=70"]


def test_replicas_migrating_at_once_take_turns(scratch_url: str) -> None:
    """Four replicas start together: the advisory lock serializes them, all succeed."""

    env = {**os.environ, "DATABASE_URL": scratch_url, "REDIS_URL": "redis://127.0.0.1:1/0"}
    replicas = [
        subprocess.Popen(
            [sys.executable, "-m", "increment_service", "migrate"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for replica in replicas:
        _, err = replica.communicate(timeout=120)
        assert replica.returncode == 0, err.decode()
    assert asyncio.run(_diff(scratch_url)) == []


def test_offline_sql_scripts_are_refused(scratch_url: str) -> None:
    with pytest.raises(SystemExit, match="not supported"):
        command.upgrade(_config(scratch_url), "head", sql=True)


def test_email_uniqueness_ignores_case(scratch_url: str) -> None:
    migrate(scratch_url)

    async def insert_twice() -> None:
        conn = await asyncpg.connect(scratch_url)
        try:
            insert = "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')"
            await conn.execute(insert, uuid.uuid4(), "Ann@Example.com")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(insert, uuid.uuid4(), "ann@example.COM")
        finally:
            await conn.close()

    asyncio.run(insert_twice())
