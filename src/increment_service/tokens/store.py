"""The tokens' storage functions: each takes a connection (migration 0006, ``api_tokens``).

A revocation deletes the row and, in the same transaction, notifies ``REVOKED_CHANNEL`` with
the token's digest: every replica's listener (tokens/listener.py) evicts it once the delete
has committed, never before.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Iterable, Sequence

import asyncpg

from ..db import REQUEST_TIMEOUT_SECONDS, Connection

#: Postgres NOTIFY channel of revocations; the payload is the token's digest in hex.
REVOKED_CHANNEL = "increment_tokens_revoked"


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as listed (no secret)."""

    id: uuid.UUID
    name: str
    scopes: tuple[str, ...]
    created_at: datetime.datetime
    expires_at: datetime.datetime | None
    last_used_at: datetime.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What a token lets its bearer do, as the check needs it."""

    token_id: uuid.UUID
    user_id: str
    scopes: frozenset[str]
    expires_at: float | None  # Unix seconds


class TooMany(Exception):
    """The user holds ``cap`` live tokens already."""


class NoSuchUser(Exception):
    """The session's user is gone."""


async def insert(
    conn: Connection,
    user_id: str,
    name: str,
    scopes: Sequence[str],
    token_digest: bytes,
    expires_in: int | None,
    cap: int,
) -> TokenRow:
    """Store a new token of ``user_id``, unless the user holds ``cap`` live (unexpired) ones
    already (TooMany). The user's row is locked meanwhile: two creations at once cannot both
    take the last place."""
    async with conn.transaction():
        live = await conn.fetchval(
            "WITH owner AS (SELECT id FROM users WHERE id = $1 FOR UPDATE)"
            " SELECT count(*) FROM api_tokens t JOIN owner ON t.user_id = owner.id"
            " WHERE t.expires_at IS NULL OR t.expires_at > now()",
            uuid.UUID(user_id),
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        if live >= cap:
            raise TooMany(user_id)
        try:
            row = await conn.fetchrow(
                "INSERT INTO api_tokens (id, user_id, name, scopes, token_sha256, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::int))"
                " RETURNING id, name, scopes, created_at, expires_at, last_used_at",
                uuid.uuid4(),
                uuid.UUID(user_id),
                name,
                list(scopes),
                token_digest,
                expires_in,
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NoSuchUser(user_id) from None
    assert row is not None  # INSERT ... RETURNING returns its row
    return _row(row)


async def list_of(conn: Connection, user_id: str) -> list[TokenRow]:
    """The user's tokens, oldest first (expired ones included, until revoked)."""
    rows = await conn.fetch(
        "SELECT id, name, scopes, created_at, expires_at, last_used_at FROM api_tokens"
        " WHERE user_id = $1 ORDER BY created_at, id",
        uuid.UUID(user_id),
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    return [_row(row) for row in rows]


async def revoke(conn: Connection, user_id: str, token_id: uuid.UUID) -> bytes | None:
    """Delete the user's token and notify every replica; its digest, or None if the user has
    no such token (another user's included)."""
    async with conn.transaction():
        token_digest: bytes | None = await conn.fetchval(
            "DELETE FROM api_tokens WHERE id = $1 AND user_id = $2 RETURNING token_sha256",
            token_id,
            uuid.UUID(user_id),
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        if token_digest is not None:
            # Delivered at commit, to every listener (or lost with a listener's connection:
            # the cache lifetime bounds that case).
            await conn.execute(
                "SELECT pg_notify($1, $2)",
                REVOKED_CHANNEL,
                token_digest.hex(),
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
    return token_digest


async def grants(
    conn: Connection, digests: Sequence[bytes], statement_timeout: float
) -> dict[bytes, Grant]:
    """The grants of the tokens among ``digests`` that exist (expired ones too: the caller
    says why it refuses), in one statement."""
    rows = await conn.fetch(
        "SELECT token_sha256, id, user_id, scopes, extract(epoch FROM expires_at) AS expires"
        " FROM api_tokens WHERE token_sha256 = ANY($1::bytea[])",
        list(digests),
        timeout=statement_timeout,
    )
    return {
        bytes(row["token_sha256"]): Grant(
            row["id"],
            str(row["user_id"]),
            frozenset(row["scopes"]),
            None if row["expires"] is None else float(row["expires"]),
        )
        for row in rows
    }


async def record_use(
    conn: Connection, used: Iterable[tuple[uuid.UUID, float]], statement_timeout: float
) -> None:
    """Set ``last_used_at`` of each token to when it was last used (Unix seconds), never
    backwards (two replicas write it)."""
    ids, times = [], []
    for token_id, when in used:
        ids.append(token_id)
        times.append(when)
    await conn.execute(
        "UPDATE api_tokens t SET last_used_at = greatest(t.last_used_at, to_timestamp(u.at))"
        " FROM unnest($1::uuid[], $2::float8[]) AS u(id, at) WHERE t.id = u.id",
        ids,
        times,
        timeout=statement_timeout,
    )


def _row(row: asyncpg.Record) -> TokenRow:
    return TokenRow(
        row["id"],
        row["name"],
        tuple(row["scopes"]),
        row["created_at"],
        row["expires_at"],
        row["last_used_at"],
    )
