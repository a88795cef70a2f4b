"""Cookie sessions in Redis: the store, its cache, revocation, and the guard.

``SessionStore`` is aiohttp-session's ``RedisStorage`` (cookie ``INCREMENT_SESSION``, Redis key
``INCREMENT_SESSION_<id>``) with a per-process cache in front of its ``load_session``: the
guard runs on every guarded request, and a Redis round trip per request would cap throughput.
Login writes a session through aiohttp-session (``new_session`` and its middleware, on the
login route only); logout deletes it and tells every replica (``REVOCATION_CHANNEL``), which
evict it from their caches at once. The cache's TTL bounds how long a revoked session may still
be accepted if that message is lost.

The cache, per session id:

* a hit costs no I/O and no await;
* misses are single-flighted: one Redis read per session, every concurrent request of that
  session waits on it (once, every request of a busy session missed at the same moment);
* an entry in use is refreshed in the background after half its TTL, so a busy session never
  misses at all, and its ``last_seen`` (the idle timeout) moves on.

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
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio
from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.redis_storage import RedisStorage
from redis.exceptions import RedisError

from .metrics import Metrics
from .redis_client import redis_call
from .settings import Settings

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


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def _encode(obj: object) -> str:
    return orjson.dumps(obj).decode()


def silence_session_key_warning() -> None:
    """aiohttp-session keeps its storage and session under string request keys, and aiohttp
    3.14 warns about every string key (NotAppKeyWarning). The keys are the library's, not ours
    to change: ignore exactly that warning, from that module (idempotent)."""
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use web\.RequestKey",
        category=web.NotAppKeyWarning,
        module=r"aiohttp_session\Z",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    user_id: str
    created_at: float
    last_seen: float
    expires_at: float  # the earlier of the absolute and the idle deadline (Unix seconds)

    def as_session(self) -> Session:
        """The aiohttp-session ``Session`` of this entry (a new object: callers may change it)."""
        data = {"user_id": self.user_id, "created_at": self.created_at, "last_seen": self.last_seen}
        return Session(
            self.session_id, data={"created": int(self.last_seen), "session": data}, new=False
        )


@dataclasses.dataclass(slots=True)
class _Entry:
    info: SessionInfo
    fresh_until: float  # time.monotonic()
    refresh_after: float  # time.monotonic(): a hit after this refreshes the entry


class SessionStore(RedisStorage):
    """RedisStorage with our ids, codec, cookie attributes and timeouts, and the cache.

    The cookie is a browser-session cookie (no Max-Age/Expires): it is dropped when the
    browser closes, and the lifetime that matters is enforced server-side. aiohttp-session
    passes ``session.max_age`` to both the cookie and the Redis expiry; only the Redis expiry
    (the idle timeout, capped by the absolute one) should get it, hence ``save_cookie``.
    """

    def __init__(self, client: redis.asyncio.Redis, settings: Settings, metrics: Metrics) -> None:
        super().__init__(
            client,
            cookie_name=COOKIE_NAME,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=settings.cookie_secure or None,
            max_age=None,
            key_factory=new_session_id,
            encoder=_encode,
            decoder=orjson.loads,
        )
        self.redis = client
        # (Not max_age: the storage's own max_age, None here, is what the cookie would get.)
        self.absolute_seconds = float(settings.session_max_age_seconds)
        self.idle_seconds = float(settings.session_idle_seconds)
        # Refreshes keep last_seen within a cache TTL of the truth: small next to the idle
        # timeout.
        self.cache_ttl = min(CACHE_TTL_SECONDS, self.idle_seconds / 4)
        self._cache: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Future[SessionInfo | None]] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        # Bumped by every eviction: a lookup that started before one does not cache its result
        # (it may have read a session that has been deleted since).
        self._epoch = 0
        # Set at shutdown. Cancelling the subscriber alone is not enough: a cancel that lands
        # as redis-py's read timeout fires is swallowed (asyncio.timeout, Python 3.11), and
        # the loop would carry on; it checks this flag at least once a second.
        self.closing = False
        self._listener: asyncio.Task[None] | None = None
        self._hit = metrics.session_cache.labels(result="hit")
        self._miss = metrics.session_cache.labels(result="miss")
        self._refresh = metrics.session_cache.labels(result="refresh")

    # -- aiohttp-session's storage ---------------------------------------------------------

    def redis_key(self, session_id: str) -> str:
        """Where RedisStorage keeps a session (``cookie_name + "_" + id``): the one copy of
        its key format here, for what the storage has no method for (touch, revoke)."""
        return f"{self.cookie_name}_{session_id}"

    def save_cookie(
        self, response: web.StreamResponse, cookie_data: str, *, max_age: int | None = None
    ) -> None:
        super().save_cookie(response, cookie_data, max_age=None)

    def session_id(self, request: web.Request) -> str | None:
        """The cookie's session id, if it is shaped like one of ours (else no Redis call)."""
        value = self.load_cookie(request)
        if value is None or not _SESSION_ID.fullmatch(value):
            return None
        return value

    async def load_session(self, request: web.Request) -> Session:
        info = await self.load(request)
        return Session(None, data=None, new=True) if info is None else info.as_session()

    # -- the cache in front of it ----------------------------------------------------------

    async def load(self, request: web.Request) -> SessionInfo | None:
        """The request's live session: from the cache, else read once from Redis (a 503 when
        Redis cannot say)."""
        session_id = self.session_id(request)
        if session_id is None:
            return None
        entry = self._cache.get(session_id)
        if entry is not None:
            now = time.monotonic()
            if now < entry.fresh_until and time.time() < entry.info.expires_at:
                self._hit.inc()
                if now >= entry.refresh_after and session_id not in self._loading:
                    self._refresh_in_background(request, session_id)
                return entry.info
            # Stale, or past the deadline this replica knows of (another replica may have
            # seen the session since): ask Redis.
            self._cache.pop(session_id, None)
        self._miss.inc()
        return await redis_call(self.redis, lambda: self._load_once(request, session_id))

    def _load_once(
        self, request: web.Request, session_id: str
    ) -> asyncio.Future[SessionInfo | None]:
        """One read from Redis per session at a time; whoever asks meanwhile shares it."""
        loading = self._loading.get(session_id)
        if loading is None:
            loading = asyncio.ensure_future(self._fetch(request, session_id))
            self._loading[session_id] = loading
            loading.add_done_callback(lambda done: self._settled(session_id, done))
        # Shielded: a waiter that gives up (its own timeout) does not cancel the others' read.
        return asyncio.shield(loading)

    def _settled(self, session_id: str, done: asyncio.Future[SessionInfo | None]) -> None:
        if self._loading.get(session_id) is done:
            del self._loading[session_id]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have given up already

    def _refresh_in_background(self, request: web.Request, session_id: str) -> None:
        self._refresh.inc()

        async def refresh() -> None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                # A failure leaves the entry to expire; the next request then asks itself.
                await asyncio.wait_for(self._load_once(request, session_id), CACHE_TTL_SECONDS)

        task = asyncio.create_task(refresh(), name="session refresh")
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _fetch(self, request: web.Request, session_id: str) -> SessionInfo | None:
        """The live session from Redis (touched and cached), or None. Raises if Redis fails."""
        started, epoch = time.monotonic(), self._epoch
        info = await self._read_and_touch(request, session_id)
        if info is None:
            self.evict(session_id)
        elif epoch == self._epoch:
            # Fresh from when the read started, so a revocation is honoured within cache_ttl.
            self._remember(info, started)
        return info

    async def _read_and_touch(self, request: web.Request, session_id: str) -> SessionInfo | None:
        try:
            session = await super().load_session(request)  # the storage's read: GET, decode
            user_id = str(session["user_id"])
            created_at = float(session["created_at"])
            last_seen = float(session["last_seen"])
        except (AttributeError, KeyError, TypeError, ValueError):
            # No session, an emptied one, or not one this service wrote (aiohttp-session's
            # Session expects an object with a numeric "created"): no session.
            return None
        key = self.redis_key(session_id)
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
        data = {"created": session.created, "session": dict(session)}
        if not await self.redis.set(key, self._encoder(data), px=ttl_ms, xx=True):
            return None
        return SessionInfo(session_id, user_id, created_at, now, expires_at)

    def _remember(self, info: SessionInfo, started: float) -> None:
        cache = self._cache
        cache.pop(info.session_id, None)  # re-inserted last: the dict is oldest-first
        if len(cache) >= CACHE_MAX_ENTRIES:
            del cache[next(iter(cache))]
        cache[info.session_id] = _Entry(
            info, started + self.cache_ttl, started + self.cache_ttl / 2
        )

    def evict(self, session_id: str) -> None:
        self._epoch += 1
        self._cache.pop(session_id, None)

    def clear(self) -> None:
        self._epoch += 1
        self._cache.clear()

    # -- timeouts ------------------------------------------------------------------------

    def initial_data(self, user_id: str, now: float) -> dict[str, Any]:
        return {"user_id": user_id, "created_at": now, "last_seen": now}

    def initial_ttl_seconds(self) -> int:
        return int(min(self.idle_seconds, self.absolute_seconds))

    def _expires_at(self, created_at: float, last_seen: float) -> float:
        return min(created_at + self.absolute_seconds, last_seen + self.idle_seconds)

    # -- revocation ----------------------------------------------------------------------

    async def revoke(self, session_id: str) -> None:
        """Delete the session and tell every replica to drop it from its cache."""
        self.evict(session_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.redis_key(session_id))
            pipe.publish(REVOCATION_CHANNEL, session_id)
            await pipe.execute()

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
                # Through a typed name: redis-py annotates aclose in some releases and not in
                # others, and a call of it needs no ignore comment in either.
                close: Callable[[], Awaitable[None]] = pubsub.aclose
                with contextlib.suppress(RedisError, OSError):
                    await close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _SUBSCRIBER_MAX_BACKOFF_SECONDS)

    def start(self) -> None:
        """Listen for revocations (until ``close``)."""
        self._listener = asyncio.create_task(
            self.listen_for_revocations(), name="session revocations"
        )

    async def close(self) -> None:
        """Stop listening and refreshing: before the Redis client closes."""
        self.closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
