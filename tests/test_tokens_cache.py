"""The token check's cache and its bounds, against real Postgres (no mocks): revocation on
another replica (pushed, and with the notification lost), expiry, a Postgres outage, a flood of
well-formed bad tokens, and the idempotency scope of tokens. Clocks are the test's own
(``verifier.clock``/``wall``, moved by hand): no verdict depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.errors import InvalidToken, ServiceUnavailable
from increment_service.settings import Settings
from increment_service.tokens import listener, verifier
from increment_service.tokens.format import ALPHABET, PREFIX, RANDOM_CHARS, checksum
from tests.support.inprocess import Client
from tests.support.polling import eventually
from tests.support.postgres import CuttingProxy, database_name, persisted
from tests.support.tokens import bearer, made, signed_up

INCREMENT = {"key": "k", "value": 1}


class Frozen:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def well_formed_bad() -> str:
    body = PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return body + checksum(body)


@pytest.fixture
async def replicas(aiohttp_client: AiohttpClient, settings: Settings) -> list[Client]:
    """Two replicas of one Postgres; the second's token cache runs on a frozen clock."""
    a = await aiohttp_client(create_app(settings), cookie_jar=aiohttp.DummyCookieJar())
    b = await aiohttp_client(
        create_app(dataclasses.replace(settings, replica_id="test-b")),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    b.app[appkeys.TOKENS].verifier.clock = Frozen()
    for client in (a, b):
        await listening(client)
    return [a, b]


async def listening(client: Client) -> None:
    """Once the app's listener is connected: its connecting later would make every cached
    token be looked up again, which a test of the cache must not leave to chance."""
    revocations = client.app[appkeys.TOKENS].listener
    await eventually(lambda: revocations.connections >= 1, "the listener is connected")


def clock_of(client: Client) -> Frozen:
    clock = client.app[appkeys.TOKENS].verifier.clock
    assert isinstance(clock, Frozen)
    return clock


async def status(client: Client, token: str) -> int:
    return (await client.post("/api/increment", json=INCREMENT, headers=bearer(token))).status


async def test_a_revocation_is_pushed_to_another_replica(replicas: list[Client]) -> None:
    a, b = replicas
    _, cookie = await signed_up(a)
    token = await made(a, cookie)
    assert await status(b, token["token"]) == 202  # cached by b; its clock never moves
    assert (await a.delete(f"/api/tokens/{token['id']}", headers=cookie)).status == 204
    assert await status(a, token["token"]) == 401

    async def refused() -> bool:
        return await status(b, token["token"]) == 401

    # b's cache would trust the token forever (its clock is frozen): only the notification
    # can make b refuse it.
    await eventually(refused, "b refuses the revoked token")


async def test_a_lost_notification_is_bounded_by_the_cache_lifetime(
    replicas: list[Client], pg: asyncpg.Connection
) -> None:
    a, b = replicas
    _, cookie = await signed_up(a)
    token = await made(a, cookie)
    clock = clock_of(b)
    assert await status(b, token["token"]) == 202
    # Revoked behind the service's back: no notification at all.
    await pg.execute(
        "DELETE FROM api_tokens WHERE token_sha256 = sha256($1::text::bytea)", token["token"]
    )
    lifetime = verifier.CACHE_TTL_SECONDS
    assert 0 < lifetime <= 1.0
    clock.now += lifetime - 0.001
    assert await status(b, token["token"]) == 202, "what a lost notification costs"
    clock.now = 1000.0 + lifetime
    assert await status(b, token["token"]) == 401, "at the lifetime, Postgres is asked"


async def test_a_killed_listener_reconnects_and_looks_every_token_up_again(
    replicas: list[Client], pg: asyncpg.Connection
) -> None:
    a, b = replicas
    _, cookie = await signed_up(a)
    token = await made(a, cookie)
    assert await status(b, token["token"]) == 202
    revocations = b.app[appkeys.TOKENS].listener
    connected = revocations.connections
    application = await pg.fetchval(
        "SELECT application_name FROM pg_stat_activity WHERE pid = $1", revocations.backend_pid
    )
    assert application == listener.APPLICATION_NAME
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", revocations.backend_pid)
    assert (await a.delete(f"/api/tokens/{token['id']}", headers=cookie)).status == 204
    await eventually(lambda: revocations.connections > connected, "b's listener is back")
    # Whether b heard the notification or not, it looks the token up again: refused.
    assert await status(b, token["token"]) == 401


async def test_an_expired_token_is_refused_from_the_cache_and_from_postgres(
    replicas: list[Client], pg: asyncpg.Connection
) -> None:
    a, b = replicas
    _, cookie = await signed_up(a)
    token = await made(a, cookie, expiresInSeconds=60)
    before = await lookups(b)
    assert await status(b, token["token"]) == 202
    check = b.app[appkeys.TOKENS].verifier
    check.wall = lambda: time.time() + 61
    assert await status(b, token["token"]) == 401
    assert await lookups(b) == before + 1, "refused from the cache, at its expiry"
    await pg.execute("UPDATE api_tokens SET expires_at = now() - interval '1 s'")
    assert await status(a, token["token"]) == 401


async def lookups(client: Client) -> float:
    return client.app[appkeys.METRICS].token_lookups.labels().value


@pytest.fixture
async def cut(
    aiohttp_client: AiohttpClient, settings: Settings, database_url: str
) -> AsyncIterator[tuple[Client, CuttingProxy]]:
    """A replica whose Postgres connections go through a proxy that can refuse them."""
    async with CuttingProxy(database_url) as proxy:
        through = dataclasses.replace(settings, database_url=proxy.url(database_name(database_url)))
        client = await aiohttp_client(create_app(through), cookie_jar=aiohttp.DummyCookieJar())
        client.app[appkeys.TOKENS].verifier.clock = Frozen()
        await listening(client)
        try:
            yield client, proxy
        finally:
            proxy.refusing = False
            await client.close()


async def test_postgres_unreachable_keeps_known_tokens_and_answers_503_for_others(
    cut: tuple[Client, CuttingProxy], pg: asyncpg.Connection
) -> None:
    api, proxy = cut
    _, cookie = await signed_up(api)
    token = (await made(api, cookie))["token"]
    expiring = (await made(api, cookie, expiresInSeconds=60))["token"]
    assert await status(api, token) == 202
    assert await status(api, expiring) == 202

    proxy.refusing = True
    await pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    clock = clock_of(api)
    clock.now += 10  # every cached token must be looked up again: Postgres cannot answer
    assert await status(api, token) == 202, "verified before: still accepted"
    assert await status(api, token) == 202
    unknown = await api.post("/api/increment", json=INCREMENT, headers=bearer(well_formed_bad()))
    assert unknown.status == 503, "nobody can say the token is bad: never 401"
    assert unknown.headers["Retry-After"] == "1"
    malformed = await api.post("/api/increment", json=INCREMENT, headers=bearer("isvc_x"))
    assert malformed.status == 401, "no lookup needed to say no"
    api.app[appkeys.TOKENS].verifier.wall = lambda: time.time() + 61
    assert await status(api, expiring) == 401, "expiry still honoured"
    assert await status(api, token) == 202

    proxy.refusing = False
    clock.now += verifier.OUTAGE_SECONDS  # past the outage's window: Postgres is asked again
    assert await status(api, token) == 202
    assert await status(api, well_formed_bad()) == 401
    text = api.app[appkeys.METRICS].token_checks.labels("stale").value
    assert text >= 2


async def test_a_flood_of_well_formed_bad_tokens_is_batched_and_capped(
    replicas: list[Client],
) -> None:
    client = replicas[0]
    check = client.app[appkeys.TOKENS].verifier
    metrics = client.app[appkeys.METRICS]
    flood = [well_formed_bad() for _ in range(verifier.MAX_WAITING + 100)]
    statements, looked_up = lookups_of(client)
    # All at once: every check has asked before the first lookup begins.
    results = await asyncio.gather(*(check.check(t) for t in flood), return_exceptions=True)
    refused = [r for r in results if isinstance(r, InvalidToken)]
    busy = [r for r in results if isinstance(r, ServiceUnavailable)]
    assert len(refused) == verifier.MAX_WAITING
    assert len(busy) == 100, "beyond the waiting room: 503 at once, no lookup"
    batches = -(-verifier.MAX_WAITING // verifier.BATCH_MAX)
    assert lookups_of(client) == (statements + batches, looked_up + verifier.MAX_WAITING)
    # Asked again: remembered as unknown, no lookup at all.
    again = await asyncio.gather(*(check.check(t) for t in flood[:500]), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in again)
    assert lookups_of(client) == (statements + batches, looked_up + verifier.MAX_WAITING)
    assert metrics.token_refusals.labels("busy").value == 100


async def test_one_lookup_for_every_request_waiting_on_one_token(
    replicas: list[Client],
) -> None:
    a, b = replicas
    _, cookie = await signed_up(a)
    token = (await made(a, cookie))["token"]
    before = lookups_of(b)
    statuses = await asyncio.gather(*(status(b, token) for _ in range(50)))
    assert statuses == [202] * 50
    assert lookups_of(b) == (before[0] + 1, before[1] + 1)


def lookups_of(client: Client) -> tuple[float, float]:
    metrics = client.app[appkeys.METRICS]
    return metrics.token_lookups.labels().value, metrics.token_lookup_tokens.labels().value


async def test_two_users_tokens_have_idempotency_scopes_of_their_own(
    aiohttp_client: AiohttpClient, settings: Settings, database_url: str
) -> None:
    # A timer that never flushes during the test (9 s): only the flush below does.
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, flush_interval_seconds=9)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    _, alice = await signed_up(client)
    _, bob = await signed_up(client)
    tokens = [(await made(client, cookie))["token"] for cookie in (alice, bob)]
    keyed = {"Idempotency-Key": "same-key"}
    for token in tokens:
        response = await client.post(
            "/api/increment", json={"key": "shared", "value": 1}, headers={**keyed, **bearer(token)}
        )
        assert response.status == 202
    # Alice's session shares her tokens' scope: a replay, not applied again.
    replay = await client.post(
        "/api/increment", json={"key": "shared", "value": 1}, headers={**keyed, **alice}
    )
    assert replay.status == 202
    assert await client.app[appkeys.WRITE_BEHIND].flush()
    assert await persisted(database_url) == {"shared": 2}


async def test_tokens_do_not_depend_on_redis(
    replicas: list[Client], aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    a, _ = replicas
    _, cookie = await signed_up(a)
    token = (await made(a, cookie))["token"]
    # Another replica whose Redis is a socket nobody listens on.
    no_redis = dataclasses.replace(settings, redis_url=f"unix://{tmp_path}/no-redis.sock")
    down = await aiohttp_client(create_app(no_redis), cookie_jar=aiohttp.DummyCookieJar())
    assert await status(down, token) == 202
    assert (await down.get("/api/counters/none", headers=bearer(token))).status == 404
    with_cookie = await down.post("/api/increment", json=INCREMENT, headers=cookie)
    assert with_cookie.status == 503, "a session needs Redis; a token does not"
