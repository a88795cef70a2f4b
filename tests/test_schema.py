"""The migrations build exactly the schema the SQLAlchemy metadata describes, both ways."""

from __future__ import annotations

import asyncio
import logging
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

from increment_service import emails
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


def test_one_account_per_email_key(scratch_url: str) -> None:
    migrate(scratch_url)

    async def insert_twice() -> None:
        conn = await asyncpg.connect(scratch_url)
        try:
            insert = (
                "INSERT INTO users (id, email, email_key, password_hash) VALUES ($1, $2, $3, 'x')"
            )
            await conn.execute(insert, uuid.uuid4(), "Ann@Example.com", "ann@example.com")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(
                    insert, uuid.uuid4(), "\uff21\uff2e\uff2e@example.com", "ann@example.com"
                )
        finally:
            await conn.close()

    asyncio.run(insert_twice())


# Rows as the service stored them before migration 0003 (unique on lower(email) only):
# (email, minutes after the first row, key it gets, or None when parked).
LEGACY_USERS = [
    # A fullwidth lookalike created first: the account the old lookup gave ann@example.com to
    # (lower(email) equal to the key) keeps the key, the older lookalike is parked.
    ("\uff21\uff2e\uff2e@example.com", 0, None),
    ("ann@example.com", 1, "ann@example.com"),
    # An invisible character alone: keyed by what the address looks like.
    ("bob\u200b@example.com", 2, "bob@example.com"),
    # Neither is what the old lookup found for carol@example.com: the oldest keeps the key.
    ("carol\u00ad@example.com", 3, "carol@example.com"),
    ("caro\u200bl@example.com", 4, None),
    # A ligature created first, the plain spelling later: the plain one keeps the key.
    ("\ufb01nn@example.com", 5, None),
    ("FInn@example.com", 6, "finn@example.com"),
    # NFD first, NFC later: NFC is the key, so its row keeps it.
    ("e\u0301lise@example.com", 7, None),
    ("\u00e9lise@example.com", 8, "\u00e9lise@example.com"),
    # No normal form at all (private use): parked.
    ("\ue000@example.com", 9, None),
    # Postgres's lower() made this izzy@...; the normal form keeps the dot (i + U+0307).
    ("\u0130zzy@example.com", 10, "i\u0307zzy@example.com"),
    ("Dora@Example.COM", 11, "dora@example.com"),
]


async def _insert_legacy_users(url: str, plain: int) -> dict[str, uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        ids = {email: uuid.uuid4() for email, _, _ in LEGACY_USERS}
        await conn.executemany(
            "INSERT INTO users (id, email, password_hash, created_at)"
            " VALUES ($1, $2, 'x', now() + make_interval(mins => $3))",
            [(ids[email], email, minutes) for email, minutes, _ in LEGACY_USERS],
        )
        # More than a page of ordinary rows, so keying goes through several pages.
        await conn.copy_records_to_table(
            "users",
            records=[(uuid.uuid4(), f"User-{n}@Example.com", "x") for n in range(plain)],
            columns=["id", "email", "password_hash"],
        )
    finally:
        await conn.close()
    return ids


async def _users(url: str) -> dict[uuid.UUID, tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, email, email_key FROM users")
    finally:
        await conn.close()
    return {row["id"]: (row["email"], row["email_key"]) for row in rows}


def test_migration_0003_keys_existing_users_and_parks_collisions(
    scratch_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    command.upgrade(_config(scratch_url), "0002")
    plain = 5001  # the migration keys 5000 rows per page
    ids = asyncio.run(_insert_legacy_users(scratch_url, plain))

    with caplog.at_level(logging.INFO, logger="increment_service.schema"):
        migrate(scratch_url)

    assert asyncio.run(_diff(scratch_url)) == []
    users = asyncio.run(_users(scratch_url))
    assert len(users) == len(LEGACY_USERS) + plain, "no user is ever deleted"
    for email, _, key in LEGACY_USERS:
        stored_email, stored_key = users[ids[email]]
        assert stored_email == email, "the address as written is kept"
        assert stored_key == (key if key is not None else f"parked {ids[email]}"), email
        if key is not None:
            # The key the service will look this account up by, from the address as written
            # (invisible characters aside).
            assert emails.email_key(emails.visible_part(email)) == key
    ordinary = [key for email, key in users.values() if email.startswith("User-")]
    assert sorted(ordinary) == sorted(f"user-{n}@example.com" for n in range(plain))
    parked = sum(key is None for _, _, key in LEGACY_USERS)
    assert [r.getMessage() for r in caplog.records if "parked" in r.getMessage()] == [
        f"migration 0003: {parked} account(s) parked (email_key 'parked <id>'): their address "
        "collides with another account's or has no normal form"
    ]
    # Downgrade restores the old index (no two rows share lower(email)), upgrade is repeatable.
    command.downgrade(_config(scratch_url), "0002")
    migrate(scratch_url)
    assert asyncio.run(_users(scratch_url)) == users


async def _insert_as_an_old_replica(url: str, email: str) -> str:
    """The insert of a replica from before migration 0003: no email_key. The outcome."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
            uuid.uuid4(),
            email,
        )
        key: str = await conn.fetchval("SELECT email_key FROM users WHERE email = $1", email)
        return key
    except asyncpg.UniqueViolationError:
        return "duplicate"  # what the old replica answers 409 for
    finally:
        await conn.close()


def test_replicas_older_than_0003_still_create_users_during_a_rolling_update(
    scratch_url: str,
) -> None:
    migrate(scratch_url)
    assert asyncio.run(_insert_as_an_old_replica(scratch_url, "Old@Example.com")) == (
        "old@example.com"
    )
    assert asyncio.run(_insert_as_an_old_replica(scratch_url, "OLD@example.com")) == "duplicate"
    assert emails.email_key("Old@Example.com") == "old@example.com", "the key new replicas use"


def test_api_tokens_are_unique_by_digest_and_go_with_their_user(scratch_url: str) -> None:
    migrate(scratch_url)

    async def check() -> None:
        conn = await asyncpg.connect(scratch_url)
        try:
            user = uuid.uuid4()
            await conn.execute(
                "INSERT INTO users (id, email, email_key, password_hash)"
                " VALUES ($1, 'a', 'a', 'x')",
                user,
            )
            insert = (
                "INSERT INTO api_tokens (id, user_id, name, scopes, token_sha256)"
                " VALUES ($1, $2, 'n', '{read}', $3)"
            )
            await conn.execute(insert, uuid.uuid4(), user, b"d" * 32)
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(insert, uuid.uuid4(), user, b"d" * 32)
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute(insert, uuid.uuid4(), uuid.uuid4(), b"e" * 32)
            await conn.execute("DELETE FROM users WHERE id = $1", user)
            assert await conn.fetchval("SELECT count(*) FROM api_tokens") == 0
        finally:
            await conn.close()

    asyncio.run(check())
