"""Users and sessions end to end, against real Postgres and Redis (no mocks).

Cookies are handled by hand (clients get a DummyCookieJar): a test says which cookie it sends
to which replica. A second ``create_app`` on the same database and Redis is another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import statistics
import time
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys, emails, sessions, throttle
from increment_service.app import create_app
from increment_service.redis_client import REDIS_TIMEOUT_SECONDS
from increment_service.settings import Settings
from tests.support.inprocess import Client
from tests.support.metrics import app_metric
from tests.support.problems import assert_problem
from tests.support.processes import ServiceProcess
from tests.support.redis_server import ThrowawayRedis

PASSWORD = "correct horse battery"
COOKIE = sessions.COOKIE_NAME

MakeClient = Callable[[Settings], Awaitable[Client]]


def email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


def cookie_header(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session_id}"}


def set_cookie(response: aiohttp.ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        jar.load(header)
    return jar


@pytest.fixture
async def make_client(aiohttp_client: AiohttpClient) -> MakeClient:
    """A client for a new app (a replica) that never stores cookies by itself."""

    async def make(settings: Settings) -> Client:
        return await aiohttp_client(create_app(settings), cookie_jar=aiohttp.DummyCookieJar())

    return make


@pytest.fixture
async def api(make_client: MakeClient, settings: Settings) -> Client:
    return await make_client(settings)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def stored(client: redis.asyncio.Redis, key: str) -> bytes:
    """What Redis holds at ``key``; fails when it holds nothing."""
    value = await client.get(key)
    assert isinstance(value, bytes), f"nothing at {key}"
    return value


async def create_user(client: Client, address: str, password: str = PASSWORD) -> str:
    response = await client.post("/api/users", json={"email": address, "password": password})
    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["email"] == address
    return str(body["id"])


async def login(client: Client, address: str, password: str = PASSWORD, **kw: Any) -> str:
    """Log in; the session id of the cookie."""
    response = await client.post(
        "/api/sessions", json={"email": address, "password": password}, **kw
    )
    assert response.status == 201, await response.text()
    return set_cookie(response)[COOKIE].value


def redis_key(client: Client, session_id: str) -> str:
    """Where the service keeps a session (the store's one copy of RedisStorage's format)."""
    return client.app[appkeys.SESSIONS].redis_key(session_id)


async def whoami(client: Client, session_id: str) -> int:
    return (await client.get("/api/sessions", headers=cookie_header(session_id))).status


async def poll_status(
    client: Client, session_id: str, want: int, within: float
) -> tuple[int, float]:
    """GET /api/sessions until it answers ``want`` or ``within`` seconds pass."""
    started = time.monotonic()
    while True:
        status = await whoami(client, session_id)
        elapsed = time.monotonic() - started
        if status == want or elapsed > within:
            return status, elapsed
        await asyncio.sleep(0.02)


# --- the flow ---------------------------------------------------------------------------


async def test_flow_end_to_end_and_logout_reaches_another_replica(
    make_client: MakeClient, settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    a = await make_client(settings)
    b = await make_client(dataclasses.replace(settings, replica_id="test-b"))
    address = email()
    user_id = await create_user(a, address)

    response = await a.post("/api/sessions", json={"email": address, "password": PASSWORD})
    assert response.status == 201
    assert await response.json() == {"userId": user_id}
    sid = set_cookie(response)[COOKIE].value

    read = await a.get("/api/sessions", headers=cookie_header(sid))
    assert read.status == 200
    assert await read.json() == {"userId": user_id}
    increment = await a.post(
        "/api/increment", json={"key": "flow", "value": 3}, headers=cookie_header(sid)
    )
    assert increment.status == 202
    assert await increment.read() == b""
    # Replica b knows the session too, and now holds it in its cache.
    assert await whoami(b, sid) == 200
    assert await whoami(b, sid) == 200

    logout = await a.delete("/api/sessions", headers=cookie_header(sid))
    assert logout.status == 204
    cleared = set_cookie(logout)[COOKIE]
    assert cleared.value == ""
    assert cleared["max-age"] == "0"
    assert not await redis_client.exists(redis_key(a, sid))
    assert await whoami(a, sid) == 401
    status, elapsed = await poll_status(b, sid, 401, within=1.5)
    assert status == 401
    assert elapsed < 1.0

    # Idempotent: the same cookie again, and no cookie at all.
    assert (await a.delete("/api/sessions", headers=cookie_header(sid))).status == 204
    assert (await b.delete("/api/sessions")).status == 204

    metrics = await (await a.get("/metrics")).text()
    assert 'session_logins_total{outcome="success"} 1.0' in metrics
    assert 'session_cache_lookups_total{result="miss"}' in metrics
    b_metrics = await (await b.get("/metrics")).text()
    assert 'session_cache_lookups_total{result="hit"}' in b_metrics


async def test_a_lost_revocation_message_expires_within_a_second(
    make_client: MakeClient,
    settings: Settings,
    redis_client: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache's TTL bounds a revocation even when pub/sub says nothing: the key is
    deleted behind the service's back, no message is published. The cache's clock is the
    test's (frozen, moved by hand), so the bound is checked exactly, not against wall time."""
    now = [1000.0]
    monkeypatch.setattr(
        sessions, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    )
    api = await make_client(settings)
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    assert await whoami(api, sid) == 200  # cached now, at 1000.0
    await redis_client.delete(redis_key(api, sid))
    assert await whoami(api, sid) == 200, "what a lost message costs: the cache still serves it"
    ttl = api.app[appkeys.SESSIONS].cache_ttl
    assert 0 < ttl <= sessions.CACHE_TTL_SECONDS == 1.0
    now[0] = 1000.0 + ttl - 0.001
    assert await whoami(api, sid) == 200, "within the TTL"
    now[0] = 1000.0 + ttl
    assert await whoami(api, sid) == 401, "at the TTL, Redis is asked, and says it is gone"


async def test_counters_need_a_session(api: Client) -> None:
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    assert (
        await api.post("/api/increment", json={"key": "c", "value": 5}, headers=cookie_header(sid))
    ).status == 202
    await api.app[appkeys.WRITE_BEHIND].flush()

    response = await api.get("/api/counters/c", headers=cookie_header(sid))
    assert response.status == 200
    body = await response.json()
    assert body["key"] == "c"
    assert body["value"] == 5
    assert datetime.fromisoformat(body["updatedAt"]).tzinfo is not None
    await assert_problem(await api.get("/api/counters/never", headers=cookie_header(sid)), 404)
    too_long = "k" * 257  # no key this long can exist: 404 without asking Postgres
    await assert_problem(
        await api.get(f"/api/counters/{too_long}", headers=cookie_header(sid)), 404
    )
    slashed = await api.post(
        "/api/increment", json={"key": "a/b c", "value": 2}, headers=cookie_header(sid)
    )
    assert slashed.status == 202
    await api.app[appkeys.WRITE_BEHIND].flush()
    response = await api.get("/api/counters/a/b%20c", headers=cookie_header(sid))
    assert (await response.json())["value"] == 2, "the rest of the path is the key, decoded"

    for headers in ({}, cookie_header("not-a-session"), cookie_header("x" * 43)):
        body = await assert_problem(await api.get("/api/counters/c", headers=headers), 401)
        assert body["detail"] == sessions.UNAUTHORIZED
        await assert_problem(
            await api.post("/api/increment", json={"key": "c", "value": 1}, headers=headers), 401
        )
    await assert_problem(await api.get("/api/sessions"), 401)


class CountingGets:
    """Counts the GETs a replica's Redis client sends (they still reach the real Redis)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.calls = 0
        self._get = client.get

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self._get(*args, **kwargs)


async def test_a_cache_miss_is_one_redis_read_for_every_waiting_request(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    store = api.app[appkeys.SESSIONS]
    gets = CountingGets(store.redis)
    monkeypatch.setattr(store.redis, "get", gets)
    for _ in range(3):
        store.evict(sid)  # as when the entry expires under load
        statuses = await asyncio.gather(*(whoami(api, sid) for _ in range(40)))
        assert statuses == [200] * 40
    assert gets.calls == 3, "one read per expiry, shared by the 40 requests waiting on it"


async def test_a_session_in_use_is_refreshed_before_it_expires(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    assert await whoami(api, sid) == 200  # the first read caches it
    misses = await app_metric(api, 'session_cache_lookups_total{result="miss"}')
    before = orjson.loads(await stored(redis_client, redis_key(api, sid)))["session"]["last_seen"]
    started = time.monotonic()
    while time.monotonic() - started < 3 * sessions.CACHE_TTL_SECONDS:
        assert await whoami(api, sid) == 200
        await asyncio.sleep(0.05)
    assert await app_metric(api, 'session_cache_lookups_total{result="miss"}') == misses, (
        "no request of a busy session waited on Redis"
    )
    assert await app_metric(api, 'session_cache_lookups_total{result="refresh"}') >= 2
    after = orjson.loads(await stored(redis_client, redis_key(api, sid)))["session"]["last_seen"]
    assert after > before, "refreshes move last_seen on (the idle timeout follows use)"


async def test_a_foreign_value_under_a_session_key_is_no_session(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    sid = sessions.new_session_id()
    foreign = (
        b"{}",
        b"not json",
        b"\xff",
        b"[1, 2]",
        b"5",
        b'{"session": 5}',
        b'{"created": "x", "session": {"user_id": "u", "created_at": 1, "last_seen": 1}}',
        b'{"session": {"user_id": "u"}}',
    )
    for value in foreign:
        await redis_client.set(redis_key(api, sid), value)
        assert await whoami(api, sid) == 401


# --- cookie, id and timeouts ------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
async def test_cookie_flags_and_session_id(
    make_client: MakeClient, settings: Settings, redis_client: redis.asyncio.Redis, secure: bool
) -> None:
    api = await make_client(dataclasses.replace(settings, cookie_secure=secure))
    address = email()
    await create_user(api, address)
    response = await api.post("/api/sessions", json={"email": address, "password": PASSWORD})
    headers = response.headers.getall("Set-Cookie")
    assert len(headers) == 1
    attributes = [part.strip().lower() for part in headers[0].split(";")]
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/" in attributes
    assert ("secure" in attributes) is secure
    # A browser-session cookie: the lifetime is enforced by the server.
    assert not any(a.startswith(("max-age", "expires")) for a in attributes)

    sid = set_cookie(response)[COOKIE].value
    assert len(sid) == 43  # 32 random bytes, URL-safe base64: 256 bits
    ttl = await redis_client.ttl(f"INCREMENT_SESSION_{sid}")  # RedisStorage's key format
    assert 0 < ttl <= settings.session_idle_seconds


async def test_login_gives_a_new_id_whatever_cookie_was_planted(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    victim, attacker = email(), email()
    await create_user(api, victim)
    await create_user(api, attacker)
    attackers_sid = await login(api, attacker)
    for planted in (sessions.new_session_id(), attackers_sid, "junk"):
        sid = await login(api, victim, headers=cookie_header(planted))
        assert sid != planted
        assert await whoami(api, sid) == 200
        # The planted id is dead (rotation), not upgraded to the victim's session.
        assert await whoami(api, planted) == 401
        assert not await redis_client.exists(redis_key(api, planted))


async def test_idle_timeout(make_client: MakeClient, settings: Settings) -> None:
    api = await make_client(
        dataclasses.replace(settings, session_idle_seconds=1, session_max_age_seconds=2)
    )
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    assert await whoami(api, sid) == 200
    await asyncio.sleep(1.3)
    assert await whoami(api, sid) == 401


async def test_absolute_timeout_despite_activity(
    make_client: MakeClient, settings: Settings
) -> None:
    api = await make_client(
        dataclasses.replace(settings, session_idle_seconds=1, session_max_age_seconds=2)
    )
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    logged_in = time.monotonic()  # the session was created a little before this
    # Used every 0.2 s: the idle timeout never fires, the absolute one does.
    while (elapsed := time.monotonic() - logged_in) < 1.4:
        assert await whoami(api, sid) == 200, f"refused after {elapsed:.2f}s"
        await asyncio.sleep(0.2)
    await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - logged_in)))
    assert await whoami(api, sid) == 401


# --- users and passwords ----------------------------------------------------------------


async def test_password_length_is_counted_in_utf8_bytes(api: Client) -> None:
    too_long = await api.post("/api/users", json={"email": email(), "password": "a" * 73})
    body = await assert_problem(too_long, 422)
    assert [e["pointer"] for e in body["errors"]] == ["/password"]
    await assert_problem(
        await api.post("/api/users", json={"email": email(), "password": "é" * 37}), 422
    )
    await assert_problem(
        await api.post("/api/users", json={"email": email(), "password": "1234567"}), 422
    )

    multibyte = "é" * 36  # 36 characters, 72 bytes
    address = email()
    await create_user(api, address, multibyte)
    await login(api, address, multibyte)
    # The 73rd byte is not silently dropped: a longer password is not the same password.
    response = await api.post("/api/sessions", json={"email": address, "password": multibyte + "x"})
    await assert_problem(response, 401)


@pytest.mark.parametrize(
    "body",
    [
        {"email": "no-at-sign", "password": PASSWORD},
        {"email": "a@b", "password": PASSWORD},
        {"email": "a b@example.com", "password": PASSWORD},
        {"email": "x" * 250 + "@example.com", "password": PASSWORD},
        {"email": 7, "password": PASSWORD},
        {"email": "a@example.com", "password": 12345678},
        {"email": "a@example.com", "password": "\ud800" * 8},
        {"email": "a@example.com"},
        {"email": "a@example.com", "password": PASSWORD, "admin": True},
        [],
    ],
)
async def test_bad_user_bodies_are_422(api: Client, body: Any) -> None:
    body = await assert_problem(await api.post("/api/users", json=body), 422)
    assert body["type"].endswith(":validation")


async def test_user_bodies_share_the_json_rules(api: Client) -> None:
    await assert_problem(
        await api.post("/api/users", data=b"{", headers={"Content-Type": "application/json"}), 400
    )
    await assert_problem(
        await api.post("/api/users", data=b"{}", headers={"Content-Type": "text/plain"}), 415
    )
    await assert_problem(await api.post("/api/sessions", json={"email": "a@example.com"}), 422)


async def test_duplicate_email_in_another_case_is_409(api: Client) -> None:
    address = email()
    await create_user(api, address)
    response = await api.post("/api/users", json={"email": address.upper(), "password": PASSWORD})
    await assert_problem(response, 409)
    # Logging in is case-insensitive too.
    await login(api, address.upper())
    metrics = await (await api.get("/metrics")).text()
    assert 'user_signups_total{outcome="created"} 1.0' in metrics
    assert 'user_signups_total{outcome="duplicate"} 1.0' in metrics


async def test_unknown_email_and_wrong_password_answer_alike(api: Client) -> None:
    address = email()
    await create_user(api, address)
    await login(api, address)  # the first login of an app also makes the dummy hash

    async def attempt(who: str, password: str) -> tuple[int, str, bytes, float]:
        started = time.perf_counter()
        response = await api.post("/api/sessions", json={"email": who, "password": password})
        body = await response.read()
        return response.status, response.content_type, body, time.perf_counter() - started

    unknown = [await attempt(email(), PASSWORD) for _ in range(3)]
    wrong = [await attempt(address, "wrong password") for _ in range(3)]
    assert {r[:3] for r in unknown} == {r[:3] for r in wrong}
    assert unknown[0][0] == 401
    assert "set-cookie" not in {
        h.lower()
        for h in (
            await api.post("/api/sessions", json={"email": email(), "password": PASSWORD})
        ).headers
    }
    # Both run one bcrypt check: the medians differ by far less than a factor of two.
    slow, fast = sorted(
        [statistics.median(r[3] for r in unknown), statistics.median(r[3] for r in wrong)]
    )
    assert slow < 2 * fast


# --- emails in one normal form ----------------------------------------------------------


async def test_no_spelling_of_an_email_gets_a_second_guess_budget(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    """Issue 9, item 4: ten wrong passwords for iia@x.co gave 429, then the right password as
    İia@x.co gave 201 for the same user: the throttle counted Python's email.lower(), the
    lookup used Postgres's lower(), and the two disagree on U+0130. Both now use the key."""
    user_id = await create_user(api, "iia@x.co")
    spellings = ["iia@x.co", "IIA@x.co", "\uff49ia@x.co", "Iia@X.CO", "i\uff49\uff41@x.co"]
    guesses = [
        await api.post(
            "/api/sessions", json={"email": spellings[n % len(spellings)], "password": f"no-{n:04}"}
        )
        for n in range(throttle.ACCOUNT_LIMIT)
    ]
    assert [r.status for r in guesses] == [401] * throttle.ACCOUNT_LIMIT
    # Every spelling of the account shares its one budget, the right password included.
    for spelling in spellings:
        response = await api.post("/api/sessions", json={"email": spelling, "password": PASSWORD})
        await assert_problem(response, 429)
    # İ is no spelling of i (full case folding keeps its dot): İia@x.co is another, unknown,
    # account. The right password of iia@x.co does not open iia@x.co through it.
    response = await api.post(
        "/api/sessions", json={"email": "\u0130ia@x.co", "password": PASSWORD}
    )
    await assert_problem(response, 401)
    assert "Set-Cookie" not in response.headers
    # One count per key, under the key the lookup uses.
    counted = throttle.Subjects.of(emails.email_key("\u0130IA@x.co"), "127.0.0.1").account
    assert counted is not None
    assert int(await stored(redis_client, counted)) == 1
    await redis_client.delete(throttle.Subjects.of("iia@x.co", "127.0.0.1").account or "")
    response = await api.post(
        "/api/sessions", json={"email": "\uff49IA@x.co", "password": PASSWORD}
    )
    assert response.status == 201
    assert (await response.json())["userId"] == user_id


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("ann@example.com", "\uff41nn@example.com"),  # fullwidth a
        ("fin@example.com", "\ufb01n@example.com"),  # the ligature fi
        ("\u00e9lise@example.com", "e\u0301lise@example.com"),  # NFC, then NFD
        ("e\u0301lise@example.com", "\u00e9lise@example.com"),  # NFD, then NFC
        ("strasse@example.com", "STRA\u00dfE@example.com"),  # case folding, not lower()
    ],
)
async def test_lookalike_emails_are_one_account(
    api: Client, pg: asyncpg.Connection, first: str, second: str
) -> None:
    user_id = await create_user(api, first)
    response = await api.post("/api/users", json={"email": second, "password": PASSWORD})
    await assert_problem(response, 409)
    for spelling in (second, first):
        response = await api.post("/api/sessions", json={"email": spelling, "password": PASSWORD})
        assert response.status == 201, await response.text()
        assert (await response.json())["userId"] == user_id
    assert await pg.fetchval("SELECT count(*) FROM users") == 1


@pytest.mark.parametrize("invisible", ["\u200b", "\u00ad"])  # zero-width space, soft hyphen
async def test_emails_with_invisible_characters_are_refused_and_match_nobody(
    api: Client, pg: asyncpg.Connection, invisible: str
) -> None:
    await create_user(api, "ann@example.com")
    unknown = await api.post("/api/sessions", json={"email": email(), "password": PASSWORD})
    unknown_body = await assert_problem(unknown, 401)
    for address in (f"ann@example.com{invisible}", f"an{invisible}n@example.com"):
        body = await assert_problem(
            await api.post("/api/users", json={"email": address, "password": PASSWORD}), 422
        )
        assert body["errors"] == [{"pointer": "/email", "detail": emails.HIDDEN_CHARACTERS}]
        # Logging in with it is no 422 that would set it apart: it matches no account, and
        # answers as an unknown email does, even with the password of ann@example.com.
        response = await api.post("/api/sessions", json={"email": address, "password": PASSWORD})
        assert await assert_problem(response, 401) == unknown_body
    rows = await pg.fetch("SELECT email, email_key FROM users")
    assert [tuple(row) for row in rows] == [("ann@example.com", "ann@example.com")]


# --- brute force ------------------------------------------------------------------------


async def test_account_brute_force_is_throttled_then_forgiven(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    address = email()
    await create_user(api, address)
    guesses = await asyncio.gather(
        *(
            api.post("/api/sessions", json={"email": address, "password": f"guess-{n:04}"})
            for n in range(throttle.ACCOUNT_LIMIT)
        )
    )
    assert [r.status for r in guesses] == [401] * throttle.ACCOUNT_LIMIT

    for password in ("one more guess", PASSWORD):  # even the right password waits
        response = await api.post(
            "/api/sessions", json={"email": address.upper(), "password": password}
        )
        await assert_problem(response, 429)
        assert 0 < int(response.headers["Retry-After"]) <= throttle.WINDOW_SECONDS

    # No permanent lockout: the count lives for one window, then Redis drops it.
    account = throttle.Subjects.of(address, "127.0.0.1").account
    assert account is not None
    assert 0 < await redis_client.pttl(account) <= throttle.WINDOW_SECONDS * 1000
    await redis_client.delete(account)  # as if the window had passed
    await login(api, address)
    metrics = await (await api.get("/metrics")).text()
    assert f'session_logins_total{{outcome="failure"}} {throttle.ACCOUNT_LIMIT}.0' in metrics
    assert 'session_logins_total{outcome="throttled"} 2.0' in metrics


async def test_a_success_clears_the_account_count(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    address = email()
    await create_user(api, address)
    for _ in range(2):
        response = await api.post("/api/sessions", json={"email": address, "password": "nope-nope"})
        assert response.status == 401
    subjects = throttle.Subjects.of(address, "127.0.0.1")
    assert int(await stored(redis_client, subjects.address)) == 2
    await login(api, address)
    assert subjects.account is not None
    assert not await redis_client.exists(subjects.account)
    assert int(await stored(redis_client, subjects.address)) == 2  # the success took its own back


async def fill_address_budget(client: redis.asyncio.Redis, address: str) -> None:
    for _ in range(throttle.ADDRESS_LIMIT):
        await throttle.count_attempt(client, throttle.Subjects.of(email(), address))


async def test_address_brute_force_is_throttled(
    api: Client, redis_client: redis.asyncio.Redis
) -> None:
    await fill_address_budget(redis_client, "127.0.0.1")
    response = await api.post("/api/sessions", json={"email": email(), "password": PASSWORD})
    await assert_problem(response, 429)
    assert int(response.headers["Retry-After"]) > 0
    # Without TRUSTED_PROXIES, X-Forwarded-For is the client's word and is ignored.
    response = await api.post(
        "/api/sessions",
        json={"email": email(), "password": PASSWORD},
        headers={"X-Forwarded-For": "198.51.100.9"},
    )
    assert response.status == 429


async def test_behind_a_trusted_proxy_the_forwarded_address_counts(
    make_client: MakeClient, settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    api = await make_client(
        dataclasses.replace(settings, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    )
    await fill_address_budget(redis_client, "203.0.113.7")

    async def status(forwarded: str) -> int:
        response = await api.post(
            "/api/sessions",
            json={"email": email(), "password": PASSWORD},
            headers={"X-Forwarded-For": forwarded},
        )
        return response.status

    assert await status("203.0.113.7") == 429
    # The client may prepend anything; the address the proxy appended is the one counted.
    assert await status("203.0.113.7, 203.0.113.8") == 401
    assert await status("203.0.113.8, 203.0.113.7") == 429


async def test_account_creation_is_throttled_per_address_before_any_hash(
    make_client: MakeClient,
    settings: Settings,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 9, item 6: POST /api/users had no throttle (40 bcrypt hashes in 5 s from one
    address). Now SIGNUP_LIMIT valid requests per address and window, counted before bcrypt."""
    api = await make_client(
        dataclasses.replace(settings, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    )
    passwords = api.app[appkeys.PASSWORDS]
    hash_password = passwords.hash
    hashed: list[bytes] = []

    async def counted_hash(password: bytes) -> bytes:  # the real hash, counted
        hashed.append(password)
        return await hash_password(password)

    monkeypatch.setattr(passwords, "hash", counted_hash)
    flood = {"X-Forwarded-For": "198.51.100.7"}
    # Bad bodies cost no hash and are not counted: refused before the throttle.
    for body in ({"email": "not an email", "password": PASSWORD}, {"email": email()}):
        await assert_problem(await api.post("/api/users", json=body, headers=flood), 422)
    attempts = 40
    responses = await asyncio.gather(
        *(
            api.post("/api/users", json={"email": email(), "password": PASSWORD}, headers=flood)
            for _ in range(attempts)
        )
    )
    statuses = Counter(r.status for r in responses)
    assert statuses == {201: throttle.SIGNUP_LIMIT, 429: attempts - throttle.SIGNUP_LIMIT}
    for response in responses:
        if response.status == 429:
            body = await assert_problem(response, 429)
            assert body["type"].endswith(":too-many-requests")
            assert 0 < int(response.headers["Retry-After"]) <= throttle.WINDOW_SECONDS
    assert len(hashed) == throttle.SIGNUP_LIMIT
    assert await pg.fetchval("SELECT count(*) FROM users") == throttle.SIGNUP_LIMIT

    # Another address has a budget of its own.
    response = await api.post(
        "/api/users",
        json={"email": email(), "password": PASSWORD},
        headers={"X-Forwarded-For": "198.51.100.8"},
    )
    assert response.status == 201
    metrics = await (await api.get("/metrics")).text()
    assert f'user_signups_total{{outcome="created"}} {throttle.SIGNUP_LIMIT + 1}.0' in metrics
    throttled = attempts - throttle.SIGNUP_LIMIT
    assert f'user_signups_total{{outcome="throttled"}} {throttled}.0' in metrics


# --- Redis outage -----------------------------------------------------------------------


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def test_redis_down_guarded_routes_fail_closed_open_increment_works(
    make_client: MakeClient, settings: Settings, throwaway_redis: ThrowawayRedis
) -> None:
    await throwaway_redis.started()
    api = await make_client(dataclasses.replace(settings, redis_url=throwaway_redis.url))
    address = email()
    await create_user(api, address)
    sid = await login(api, address)
    assert await whoami(api, sid) == 200

    throwaway_redis.stop()
    # Within the cache's TTL the guard may still answer from memory; then it must fail closed.
    status, _ = await poll_status(api, sid, 503, within=2.0)
    assert status == 503
    started = time.monotonic()
    for response in (
        await api.get("/api/sessions", headers=cookie_header(sid)),
        await api.get("/api/counters/k", headers=cookie_header(sid)),
        await api.post("/api/increment", json={"key": "k", "value": 1}, headers=cookie_header(sid)),
        await api.post("/api/sessions", json={"email": address, "password": PASSWORD}),
        await api.delete("/api/sessions", headers=cookie_header(sid)),
        # Account creation counts its attempt in Redis before it hashes anything.
        await api.post("/api/users", json={"email": email(), "password": PASSWORD}),
    ):
        body = await assert_problem(response, 503)
        assert body["type"].endswith(":unavailable")
        assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 6 * REDIS_TIMEOUT_SECONDS
    # The open endpoint never touches Redis; no cookie means 401 without asking Redis either.
    for _ in range(3):
        assert (await api.post("/increment", json={"key": "open", "value": 1})).status == 202
    await assert_problem(await api.get("/api/sessions"), 401)

    await throwaway_redis.started()
    # Back at once: no request pays for the pooled connections that died with the old server.
    # The sessions were in memory only (no persistence): the old cookie is simply unknown.
    assert await whoami(api, sid) == 401
    sid = await login(api, address)
    assert await whoami(api, sid) == 200
    assert (
        await api.post("/api/increment", json={"key": "k", "value": 1}, headers=cookie_header(sid))
    ).status == 202


# --- real processes ---------------------------------------------------------------------


async def test_two_service_processes_share_sessions(
    database_url: str, redis_url: str, clean: None, tmp_path: Path
) -> None:
    def service(name: str) -> ServiceProcess:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DATA_DIR": str(tmp_path / name),
            "REPLICA_ID": name,
            "AUTO_MIGRATE": "false",
            "INCREMENT_AUTH": "session",
        }
        return ServiceProcess(env, tmp_path / f"{name}.log")

    a, b = service("a"), service("b")
    with contextlib.ExitStack() as stack:
        for process in (a, b):
            stack.callback(process.stop)
        # Started side by side (each waits for its port in a thread of its own).
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            address = email()
            body = {"email": address, "password": PASSWORD}
            async with http.post(a.url + "/api/users", json=body) as response:
                assert response.status == 201
            async with http.post(a.url + "/api/sessions", json=body) as response:
                assert response.status == 201
                sid = set_cookie(response)[COOKIE].value
            cookie = cookie_header(sid)

            async def status(service: ServiceProcess, method: str, path: str, **kw: Any) -> int:
                async with http.request(method, service.url + path, **kw) as response:
                    await response.read()
                    return response.status

            increment = {"key": "two", "value": 1}
            assert await status(b, "GET", "/api/sessions", headers=cookie) == 200
            assert await status(b, "POST", "/increment", json=increment, headers=cookie) == 202
            assert await status(b, "POST", "/increment", json=increment) == 401
            assert await status(a, "DELETE", "/api/sessions", headers=cookie) == 204
            started = time.monotonic()
            while await status(b, "GET", "/api/sessions", headers=cookie) != 401:
                assert time.monotonic() - started < 1.0, "b still accepts a revoked session"
                await asyncio.sleep(0.02)
            assert await status(b, "POST", "/increment", json=increment, headers=cookie) == 401


# --- wiring ------------------------------------------------------------------------------


def test_the_session_middleware_warning_is_silenced_precisely() -> None:
    """aiohttp-session uses string request keys; only that NotAppKeyWarning is ignored."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error")
        sessions.silence_session_key_warning()
        warnings.warn_explicit(
            "It is recommended to use web.RequestKey instances for keys.",
            web.NotAppKeyWarning,
            "aiohttp_session/__init__.py",
            1,
            module="aiohttp_session",
        )
        with pytest.raises(web.NotAppKeyWarning):
            warnings.warn_explicit(
                "It is recommended to use web.RequestKey instances for keys.",
                web.NotAppKeyWarning,
                "elsewhere.py",
                1,
                module="elsewhere",
            )
    assert caught == []
