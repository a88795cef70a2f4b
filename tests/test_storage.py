"""counters.py and users.py on their own, against the real Postgres (no app, no HTTP): what a
counter reads back as, users stored and found by their email key, and the passwords' bcrypt."""

from __future__ import annotations

import datetime
import uuid

import asyncpg
import bcrypt
import pytest

from increment_service import counters, users


async def test_a_counter_reads_back_with_its_time_in_iso_8601(
    clean: None, pg: asyncpg.Connection
) -> None:
    assert await counters.get(pg, "absent") is None
    stamped = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)
    await pg.execute(
        "INSERT INTO counters (key, value, updated_at) VALUES ('k', $1, $2), ('K', 1, $2)",
        -(2**63),
        stamped,
    )
    got = await counters.get(pg, "k")
    assert got == {"key": "k", "value": -(2**63), "updatedAt": "2026-01-02T03:04:05.678000+00:00"}
    assert (await counters.get(pg, "K") or {})["value"] == 1, "keys are case-sensitive"


async def test_a_user_is_stored_and_found_by_its_email_key(
    clean: None, pg: asyncpg.Connection
) -> None:
    hashed = b"$2b$04$" + b"a" * 53
    user = await users.insert(pg, "Ann@Example.com", "ann@example.com", hashed)
    assert isinstance(user.id, uuid.UUID)
    assert (user.email, user.password_hash) == ("Ann@Example.com", hashed)
    assert await users.find_by_key(pg, "ann@example.com") == user
    assert await users.find_by_key(pg, "Ann@Example.com") is None, "by the key, not as written"
    with pytest.raises(users.DuplicateEmail, match=r"ANN@example\.com"):
        await users.insert(pg, "ANN@example.com", "ann@example.com", hashed)
    assert await pg.fetchval("SELECT count(*) FROM users") == 1


async def test_passwords_are_bcrypt_and_a_missing_one_is_false_all_the_same() -> None:
    passwords = users.Passwords(workers=1)
    try:
        hashed = await passwords.hash(b"correct horse")
        assert hashed.startswith(b"$2b$12$"), "BCRYPT_ROUNDS"
        assert users.BCRYPT_ROUNDS == 12
        assert bcrypt.checkpw(b"correct horse", hashed)
        assert await passwords.verify(b"correct horse", hashed)
        assert not await passwords.verify(b"wrong", hashed)
        assert not await passwords.verify(None, hashed)
        assert not await passwords.verify(b"correct horse", None)
    finally:
        passwords.close()
