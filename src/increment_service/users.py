"""Users: storage (functions taking a connection) and passwords (bcrypt off the event loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import bcrypt

from .db import Connection

#: bcrypt work factor: about a quarter to half a second per hash on a server core.
BCRYPT_ROUNDS = 12


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str  # as the user wrote it; accounts are told apart by its emails.email_key
    password_hash: bytes


class DuplicateEmail(Exception):
    pass


# --- storage -------------------------------------------------------------------------------


async def insert(conn: Connection, email: str, email_key: str, password_hash: bytes) -> User:
    """Insert a user; DuplicateEmail if an account has the same email key."""
    user_id = uuid.uuid4()
    try:
        await conn.execute(
            "INSERT INTO users (id, email, email_key, password_hash) VALUES ($1, $2, $3, $4)",
            user_id,
            email,
            email_key,
            password_hash.decode("ascii"),
        )
    except asyncpg.UniqueViolationError:
        raise DuplicateEmail(email) from None
    return User(user_id, email, password_hash)


async def find_by_key(conn: Connection, email_key: str) -> User | None:
    """The user whose email has this normal form (emails.email_key), by its unique index."""
    row = await conn.fetchrow(
        "SELECT id, email, password_hash FROM users WHERE email_key = $1", email_key
    )
    if row is None:
        return None
    return User(row["id"], row["email"], row["password_hash"].encode("ascii"))


# --- passwords -----------------------------------------------------------------------------


class Passwords:
    """bcrypt on threads of its own: off the event loop, and never queued in front of the
    default executor's work (DNS lookups for reconnects)."""

    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self._dummy: asyncio.Future[bytes] | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def hash(self, password: bytes) -> bytes:
        hashed: bytes = await self._run(bcrypt.hashpw, password, bcrypt.gensalt(BCRYPT_ROUNDS))
        return hashed

    async def _dummy_hash(self) -> bytes:
        # Made on the first login of this app, not at import or start-up (apps that never see
        # a login never pay for it). Every login awaits it, whatever the email, so making it
        # slows the first login of either kind alike.
        if self._dummy is None:
            self._dummy = asyncio.ensure_future(self.hash(secrets.token_bytes(32)))
        return await asyncio.shield(self._dummy)

    async def verify(self, password: bytes | None, stored: bytes | None) -> bool:
        """Check ``password`` against ``stored``; with either missing, spend the same time on
        a dummy hash and answer False, so an unknown email looks like a wrong password."""
        dummy = await self._dummy_hash()
        if password is None or stored is None:
            await self._run(bcrypt.checkpw, b"not the password", dummy)
            return False
        ok: bool = await self._run(bcrypt.checkpw, password, stored)
        return ok

    def close(self) -> None:
        # A hash still running finishes on its thread; nobody waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)
