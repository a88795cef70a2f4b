"""Cookie sessions in Redis: login, logout, and the guard of the /api surface.

Login and logout go through aiohttp-session (``RedisStorage``, cookie ``INCREMENT_SESSION``,
Redis key ``INCREMENT_SESSION_<id>``). The guard reads the same keys itself, because it runs
on every guarded request and a Redis round trip per request would cap throughput: it keeps a
short per-process cache of session id -> session, and every replica evicts a revoked id as
soon as logout publishes it on ``REVOCATION_CHANNEL``. The cache's TTL bounds how long a
revoked session may still be accepted if that message is lost.

Timeouts are enforced here, not by aiohttp-session (whose ``created`` is really "last
written"): the session holds ``created_at`` and ``last_seen`` (Unix seconds), the Redis TTL is
the idle timeout refreshed on use and capped by the absolute timeout, and every read checks
both deadlines again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp_session
import orjson
import redis.asyncio
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp_session.redis_storage import RedisStorage
from redis.exceptions import RedisError

from . import counters, emails, keys, throttle, users
from .errors import TooManyRequests, Unauthorized, ValidationFailed
from .metrics import Metrics
from .redis_client import redis_call, unavailable
from .settings import Settings
from .validation import check_object, read_json

log = logging.getLogger(__name__)

COOKIE_NAME = "INCREMENT_SESSION"
REVOCATION_CHANNEL = "INCREMENT_SESSION:revoked"
#: 32 random bytes (256 bits), URL-safe base64 without padding: 43 characters.
SESSION_ID_BYTES = 32
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")
#: How long the guard trusts a session it read from Redis (further capped at idle / 4).
CACHE_TTL_SECONDS = 1.0
CACHE_MAX_ENTRIES = 10_000
_SUBSCRIBER_MAX_BACKOFF_SECONDS = 5.0

UNAUTHORIZED = "log in first: POST /api/sessions"
BAD_CREDENTIALS = "the email or the password is wrong"


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def redis_key(session_id: str) -> str:
    """The key RedisStorage uses for a session id (``cookie_name + "_" + id``)."""
    return f"{COOKIE_NAME}_{session_id}"


def _encode(obj: object) -> str:
    return orjson.dumps(obj).decode()


class SessionStorage(RedisStorage):
    """RedisStorage with our id generator, codec and cookie attributes.

    The cookie is a browser-session cookie (no Max-Age/Expires): it is dropped when the
    browser closes, and the lifetime that matters is enforced server-side. aiohttp-session
    passes ``session.max_age`` to both the cookie and the Redis expiry; only the Redis expiry
    (the idle timeout, capped by the absolute one) should get it.
    """

    def __init__(self, client: redis.asyncio.Redis, *, secure: bool) -> None:
        super().__init__(
            client,
            cookie_name=COOKIE_NAME,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=secure or None,
            max_age=None,
            key_factory=new_session_id,
            encoder=_encode,
            decoder=orjson.loads,
        )

    def save_cookie(
        self, response: web.StreamResponse, cookie_data: str, *, max_age: int | None = None
    ) -> None:
        super().save_cookie(response, cookie_data, max_age=None)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    user_id: str
    created_at: float
    last_seen: float
    expires_at: float  # the earlier of the absolute and the idle deadline (Unix seconds)


@dataclasses.dataclass(slots=True)
class _Entry:
    info: SessionInfo
    fresh_until: float  # time.monotonic()


class Sessions:
    """The sessions of one app (one replica): lookups through a small cache, revocation."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings, metrics: Metrics) -> None:
        self.redis = client
        self.storage = SessionStorage(client, secure=settings.cookie_secure)
        self.middleware: Middleware = aiohttp_session.session_middleware(self.storage)
        self.max_age = float(settings.session_max_age_seconds)
        self.idle = float(settings.session_idle_seconds)
        # A cache hit does not refresh last_seen, so the idle timeout counts from the last
        # cache miss: the cache TTL must be small next to it.
        self.cache_ttl = min(CACHE_TTL_SECONDS, self.idle / 4)
        self._cache: dict[str, _Entry] = {}
        # Bumped by every eviction: a lookup that started before one does not cache its result
        # (it may have read a session that has been deleted since).
        self._epoch = 0
        # Set at shutdown. Cancelling the subscriber alone is not enough: a cancel that lands
        # as redis-py's read timeout fires is swallowed (asyncio.timeout, Python 3.11), and
        # the loop would carry on; it checks this flag at least once a second.
        self.closing = False
        self._hit = metrics.session_cache.labels(result="hit")
        self._miss = metrics.session_cache.labels(result="miss")

    # -- timeouts --

    def initial_data(self, user_id: str, now: float) -> dict[str, Any]:
        return {"user_id": user_id, "created_at": now, "last_seen": now}

    def initial_ttl_seconds(self) -> int:
        return int(min(self.idle, self.max_age))

    def _expires_at(self, created_at: float, last_seen: float) -> float:
        return min(created_at + self.max_age, last_seen + self.idle)

    # -- the cache --

    def evict(self, session_id: str) -> None:
        self._epoch += 1
        self._cache.pop(session_id, None)

    def clear(self) -> None:
        self._epoch += 1
        self._cache.clear()

    def _remember(self, info: SessionInfo, fresh_until: float) -> None:
        cache = self._cache
        cache.pop(info.session_id, None)  # re-inserted last: the dict is oldest-first
        if len(cache) >= CACHE_MAX_ENTRIES:
            del cache[next(iter(cache))]
        cache[info.session_id] = _Entry(info, fresh_until)

    # -- lookups --

    def cached(self, session_id: str) -> SessionInfo | None:
        """The session from this replica's cache if the entry is fresh; no Redis, no await."""
        entry = self._cache.get(session_id)
        if entry is None:
            return None
        if entry.fresh_until > time.monotonic() and time.time() < entry.info.expires_at:
            self._hit.inc()
            return entry.info
        # Stale, or past the deadline this replica knows of (another replica may have seen
        # the session since): ask Redis.
        self._cache.pop(session_id, None)
        return None

    async def fetch(self, session_id: str) -> SessionInfo | None:
        """The live session from Redis (touched and cached), or None. Raises if Redis fails."""
        self._miss.inc()
        started, epoch = time.monotonic(), self._epoch
        info = await self._load(session_id)
        if info is not None and epoch == self._epoch:
            # Fresh from when the read started, so a revocation is honoured within cache_ttl.
            self._remember(info, started + self.cache_ttl)
        return info

    async def _load(self, session_id: str) -> SessionInfo | None:
        key = redis_key(session_id)
        raw = await self.redis.get(key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            session = data["session"]
            user_id = str(session["user_id"])
            created_at = float(session["created_at"])
            last_seen = float(session["last_seen"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # Not a session this service wrote (or an emptied one): no session.
            return None
        now = time.time()
        if now >= self._expires_at(created_at, last_seen):
            # Redis expires keys on the same deadlines; this catches settings shortened since
            # the session was written, and clock skew between replicas.
            await self.redis.delete(key)
            return None
        # Touch: last_seen = now, TTL = idle timeout capped by the absolute one. XX: a session
        # deleted by a logout since the GET above is not brought back.
        session["last_seen"] = now
        expires_at = self._expires_at(created_at, now)
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000))
        if not await self.redis.set(key, orjson.dumps(data), px=ttl_ms, xx=True):
            return None
        return SessionInfo(session_id, user_id, created_at, now, expires_at)

    async def revoke(self, session_id: str) -> None:
        """Delete the session and tell every replica to drop it from its cache."""
        self.evict(session_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(redis_key(session_id))
            pipe.publish(REVOCATION_CHANNEL, session_id)
            await pipe.execute()

    # -- revocations from other replicas --

    async def listen_for_revocations(self) -> None:
        """Evict the ids published on REVOCATION_CHANNEL, for as long as the app runs.

        Whenever the subscription is lost, messages may have been lost with it: the cache is
        cleared, so nothing outlives a revocation that was missed while disconnected.
        """
        delay = 0.1
        connected = True
        while not self.closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                self.clear()
                if not connected:
                    log.info("session revocations: subscribed again", extra={"event": "redis"})
                connected, delay = True, 0.1
                while not self.closing:
                    # A timeout rather than blocking: each call also runs redis-py's health
                    # check, which notices a connection that died without a FIN.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.evict(_text(message["data"]))
            except (RedisError, OSError) as exc:
                self.clear()
                if connected:
                    log.warning(
                        "session revocations: subscription lost; retrying",
                        extra={"event": "redis", "error": f"{type(exc).__name__}: {exc}"},
                    )
                connected = False
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py
            await asyncio.sleep(delay)
            delay = min(delay * 2, _SUBSCRIBER_MAX_BACKOFF_SECONDS)


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registered after redis_ctx: needs the client, and stops before it closes."""
    sessions = Sessions(app[keys.REDIS], app[keys.SETTINGS], app[keys.METRICS])
    app[keys.SESSIONS] = sessions
    task = asyncio.create_task(sessions.listen_for_revocations(), name="session revocations")
    yield
    sessions.closing = True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def _session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp-session's middleware, made at start-up (its storage needs the Redis client).
    # It loads nothing by itself: only get_session/new_session touch Redis, and it saves only
    # a session that was loaded and changed, so routes that never ask stay Redis-free.
    try:
        return await request.app[keys.SESSIONS].middleware(request, handler)
    except RedisError as exc:  # the save after a login (handlers map their own Redis errors)
        raise unavailable() from exc


def with_session_middleware(handler: Handler) -> Handler:
    """aiohttp-session's middleware around one handler. Only login creates a session through
    aiohttp-session, so only login pays for its middleware (measured: a middleware on every
    route cost the hot path several per cent)."""
    # aiohttp-session keeps its storage and session under string request keys, and aiohttp
    # 3.14 warns about every string key (once per key and process) with NotAppKeyWarning. The
    # keys are the library's, not ours to change: silence exactly that warning from there.
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use web\.RequestKey",
        category=web.NotAppKeyWarning,
        module=r"aiohttp_session\Z",
    )

    async def with_session(request: web.Request) -> web.StreamResponse:
        return await _session_middleware(request, handler)

    return with_session


# --- the guard ------------------------------------------------------------------------------


def cookie_session_id(request: web.Request) -> str | None:
    """The session id of the cookie, if it is shaped like one of ours (else no Redis call)."""
    value = request.cookies.get(COOKIE_NAME)
    if value is None or not _SESSION_ID.fullmatch(value):
        return None
    return value


async def current_session(request: web.Request) -> SessionInfo | None:
    session_id = cookie_session_id(request)
    if session_id is None:
        return None
    sessions = request.app[keys.SESSIONS]
    # The hot path: a cache hit costs no Redis round trip and no timeout handle.
    return sessions.cached(session_id) or await redis_call(
        sessions.redis, lambda: sessions.fetch(session_id)
    )


async def require_session(request: web.Request) -> SessionInfo:
    """The request's live session, or 401 (503 if Redis cannot say)."""
    session = await current_session(request)
    if session is None:
        raise Unauthorized(UNAUTHORIZED)
    return session


# --- handlers -------------------------------------------------------------------------------


async def read_credentials(request: web.Request) -> tuple[str, bytes | None]:
    """Email and password bytes (None when they could never match: the check still runs)."""
    errors: list[dict[str, str]] = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    for name in ("email", "password"):
        if name in data and not isinstance(data[name], str):
            errors.append({"pointer": f"/{name}", "detail": "must be a string"})
    if errors:
        raise ValidationFailed("the login body is invalid", errors=errors)
    email: str = data["email"][: emails.MAX_EMAIL_CHARS + 1]
    password = users.password_bytes(data["password"])
    if password is not None and len(password) > users.MAX_PASSWORD_BYTES:
        password = None  # bcrypt refuses these; no such password was ever accepted
    return email, password


def login_key(email: str) -> str | None:
    """The email key a login looks up, or None for an email no account can have."""
    try:
        return emails.email_key(email)
    except emails.InvalidEmail:
        return None


async def login(request: web.Request) -> web.Response:
    """POST /api/sessions: check the credentials, start a session under a new id."""
    email, password = await read_credentials(request)
    app = request.app
    sessions, logins = app[keys.SESSIONS], app[keys.METRICS].logins
    # One normal form for the lookup and the account's throttle budget. An email no account
    # may have gets no 422 here: it simply matches nobody, like an unknown email.
    email_key = login_key(email)
    subjects = throttle.Subjects.of(
        email_key, throttle.client_address(request, app[keys.SETTINGS].trusted_proxies)
    )
    try:
        await redis_call(sessions.redis, lambda: throttle.count_attempt(sessions.redis, subjects))
    except TooManyRequests:
        logins.labels(outcome="throttled").inc()
        raise
    user = None
    if email_key is not None:
        async with users.connection(request) as conn:
            user = await users.find_by_key(conn, email_key)
    # Unknown email and wrong password take the same path: one bcrypt check, one answer.
    if not await app[keys.PASSWORDS].verify(password, user.password_hash if user else None):
        logins.labels(outcome="failure").inc()
        raise Unauthorized(BAD_CREDENTIALS)
    assert user is not None  # verify() is False without a stored hash
    # Rotation: whatever id the browser brought (a planted one included) ends here; the
    # session below gets a fresh id from new_session.
    previous = cookie_session_id(request)

    async def succeeded() -> None:
        await throttle.record_success(sessions.redis, subjects)
        if previous is not None:
            await sessions.revoke(previous)

    await redis_call(sessions.redis, succeeded)
    session = await aiohttp_session.new_session(request)
    session.update(sessions.initial_data(str(user.id), time.time()))
    session.max_age = sessions.initial_ttl_seconds()  # the Redis expiry (see SessionStorage)
    logins.labels(outcome="success").inc()
    # aiohttp-session's middleware writes the session to Redis and sets the cookie.
    return web.json_response({"userId": str(user.id)}, status=201, dumps=counters.dumps)


async def read(request: web.Request) -> web.Response:
    """GET /api/sessions: who is logged in."""
    session = await require_session(request)
    return web.json_response({"userId": session.user_id}, dumps=counters.dumps)


async def logout(request: web.Request) -> web.Response:
    """DELETE /api/sessions: delete the session everywhere; 204 with or without one."""
    session_id = cookie_session_id(request)
    sessions = request.app[keys.SESSIONS]
    if session_id is not None:
        await redis_call(sessions.redis, lambda: sessions.revoke(session_id))
    response = web.Response(status=204)
    sessions.storage.save_cookie(response, "")  # aiohttp-session's way to delete the cookie
    return response
