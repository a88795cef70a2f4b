"""Users: storage (functions taking a connection), passwords (bcrypt off the event loop) and
the handler of POST /api/users."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

import asyncpg
import bcrypt
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from . import counters, emails, keys, throttle
from .errors import Conflict, ServiceUnavailable, TooManyRequests, ValidationFailed
from .redis_client import redis_call
from .validation import check_object, read_json

#: bcrypt work factor: about a quarter to half a second per hash on a server core.
BCRYPT_ROUNDS = 12
#: bcrypt reads at most 72 bytes; longer passwords are refused, never silently truncated.
MIN_PASSWORD_BYTES, MAX_PASSWORD_BYTES = 8, 72
DB_TIMEOUT_SECONDS = 5.0

#: A connection of its own or one lent by the pool: the storage functions take either.
# (A string: PoolConnectionProxy is generic only in the type stubs.)
Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"


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


@contextlib.asynccontextmanager
async def connection(request: web.Request) -> AsyncIterator[Connection]:
    """A pooled connection; Postgres unreachable is a 503, not a 500."""
    try:
        async with request.app[keys.PG_POOL].acquire(timeout=DB_TIMEOUT_SECONDS) as conn:
            yield conn
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,  # Postgres starting or shutting down
        asyncpg.InterfaceError,  # "connection is closed" mid-query
    ) as exc:
        raise ServiceUnavailable(
            "the user database is unavailable; retry later", headers={"Retry-After": "1"}
        ) from exc


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


async def passwords_ctx(app: web.Application) -> AsyncIterator[None]:
    passwords = Passwords(workers=os.cpu_count() or 2)
    app[keys.PASSWORDS] = passwords
    yield
    passwords.close()


def password_bytes(password: str) -> bytes | None:
    """The UTF-8 bytes bcrypt sees, or None if the text cannot be encoded (lone surrogates)."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


# --- validation and the handler ------------------------------------------------------------


def check_email(data: dict[str, Any], errors: list[dict[str, str]]) -> tuple[str, str]:
    """The email as given and its key (emails.email_key)."""
    email = data.get("email")
    if "email" not in data:
        return "", ""
    if not isinstance(email, str):
        errors.append({"pointer": "/email", "detail": "must be a string"})
        return "", ""
    try:
        return email, emails.email_key(email)
    except emails.InvalidEmail as exc:
        errors.append({"pointer": "/email", "detail": str(exc)})
        return "", ""


def check_password(data: dict[str, Any], errors: list[dict[str, str]]) -> bytes:
    password = data.get("password")
    if "password" not in data:
        return b""
    if not isinstance(password, str):
        errors.append({"pointer": "/password", "detail": "must be a string"})
        return b""
    encoded = password_bytes(password)
    if encoded is None:
        errors.append({"pointer": "/password", "detail": "must be valid Unicode"})
    elif not MIN_PASSWORD_BYTES <= len(encoded) <= MAX_PASSWORD_BYTES:
        errors.append(
            {
                "pointer": "/password",
                "detail": f"must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes in UTF-8",
            }
        )
    else:
        return encoded
    return b""


async def read_new_user(request: web.Request) -> tuple[str, str, bytes]:
    """Email, email key and password bytes of a valid body; ValidationFailed otherwise."""
    errors: list[dict[str, str]] = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    email, email_key = check_email(data, errors)
    password = check_password(data, errors)
    if errors:
        raise ValidationFailed("the user body is invalid", errors=errors)
    return email, email_key, password


async def create_user(request: web.Request) -> web.Response:
    email, email_key, password = await read_new_user(request)
    app = request.app
    client, signups = app[keys.REDIS], app[keys.METRICS].signups
    # Counted before the hash: a flood of valid bodies costs one Redis call each, not bcrypt.
    address = throttle.client_address(request, app[keys.SETTINGS].trusted_proxies)
    try:
        await redis_call(client, lambda: throttle.count_signup(client, address))
    except TooManyRequests:
        signups.labels(outcome="throttled").inc()
        raise
    password_hash = await app[keys.PASSWORDS].hash(password)
    async with connection(request) as conn:
        try:
            user = await insert(conn, email, email_key, password_hash)
        except DuplicateEmail:
            signups.labels(outcome="duplicate").inc()
            raise Conflict("a user with that email exists") from None
    signups.labels(outcome="created").inc()
    return web.json_response(
        {"id": str(user.id), "email": user.email}, status=201, dumps=counters.dumps
    )
