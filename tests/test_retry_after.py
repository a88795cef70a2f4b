"""Every 409 and 503 of the increment routes, and every 503 for a dependency outage, carries
``Retry-After`` (issue 19, rule 4). Each answer is caused for real: a durable request held in
flight by a table lock, Postgres and Redis at a port where nothing listens, a commit whose
answer a proxy swallows, a replica full to ``MAX_PENDING_KEYS``.

The health check's 503 is a readiness answer, not a request refused: it stays without one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from increment_service import appkeys, errors
from increment_service.app import create_app
from increment_service.sessions import COOKIE_NAME
from increment_service.settings import Settings
from increment_service.writebehind import WriteBehind
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.postgres import CuttingProxy, database_name

pytestmark = pytest.mark.timeout(60)

Client = TestClient[Any, Any]
DURABLE = {"Prefer": "durable"}
ONE = {"key": "r", "value": 1}
BATCH = {"increments": [{"key": "r", "value": 1}, {"key": "s", "value": 2}]}


async def problem(response: aiohttp.ClientResponse, status: int, slug: str) -> None:
    """``response`` is the problem ``slug`` with ``status``, and says when to retry."""
    body = await response.json(content_type=None)
    assert (response.status, body["type"]) == (status, errors.problem_type(slug)), body
    assert response.content_type == "application/problem+json"
    assert response.headers.get("Retry-After") == "1", dict(response.headers)


def closed_postgres() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/none"


def closed_redis() -> str:
    """A Redis nobody serves: a socket in a directory that does not exist (a free TCP port
    could be taken by the time the replica connects)."""
    return f"unix://{tempfile.gettempdir()}/no-redis-{uuid.uuid4().hex}/redis.sock?db=0"


async def session_cookie(client: Client) -> dict[str, str]:
    credentials = {"email": f"user-{uuid.uuid4().hex[:12]}@example.com", "password": "p" * 12}
    assert (await client.post("/api/users", json=credentials)).status == 201
    response = await client.post("/api/sessions", json=credentials)
    assert response.status == 201
    return {"Cookie": f"{COOKIE_NAME}={response.cookies[COOKIE_NAME].value}"}


# --- 409: a durable request with the key is still in flight ---------------------------------


@pytest.mark.parametrize(("path", "body"), [("/increment", ONE), ("/increments", BATCH)])
async def test_a_key_in_use_is_409_with_retry_after(
    replica: Any, database_url: str, path: str, body: dict[str, Any]
) -> None:
    client = await replica(durable_timeout_seconds=3)
    keyed = {**DURABLE, "Idempotency-Key": f"held-{path}"}
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        first = asyncio.ensure_future(client.post(path, json=body, headers=keyed))
        write_behind: WriteBehind = client.app[appkeys.WRITE_BEHIND]

        async def waiting() -> bool:
            return write_behind.waiting_durably(("open", keyed["Idempotency-Key"]))

        await eventually(waiting, "the first request waits for its commit", every=0.01)
        # A durable retry and a plain one with the same key: both 409, both say when.
        plain = {"Idempotency-Key": keyed["Idempotency-Key"]}
        for headers in (keyed, plain):
            response = await client.post(path, json=body, headers=headers)
            await problem(response, 409, "idempotency-key-in-use")
        await transaction.rollback()
    finally:
        await holder.close()
    assert (await first).status == 204


# --- 503 on the increment routes ------------------------------------------------------------


async def test_durable_with_postgres_down_is_503_not_committed_with_retry_after(
    replica: Any,
) -> None:
    client = await replica(database_url=closed_postgres(), durable_timeout_seconds=1)
    for path, body in (("/increment", ONE), ("/increments", BATCH)):
        await problem(await client.post(path, json=body, headers=DURABLE), 503, "not-committed")
        keyed = {**DURABLE, "Idempotency-Key": f"down-{path}"}
        await problem(await client.post(path, json=body, headers=keyed), 503, "not-committed")


@pytest.fixture
async def proxied(
    settings: Settings, database_url: str, aiohttp_client: Any
) -> AsyncIterator[tuple[Client, CuttingProxy]]:
    async with CuttingProxy(database_url) as proxy:
        through = dataclasses.replace(
            settings,
            database_url=proxy.url(database_name(database_url)),
            flush_interval_seconds=9,
            durable_timeout_seconds=1,
        )
        client: Client = await aiohttp_client(create_app(through))
        try:
            yield client, proxy
        finally:
            proxy.refusing = False
            await client.close()


async def test_a_commit_whose_answer_is_lost_is_503_outcome_unknown_with_retry_after(
    proxied: tuple[Client, CuttingProxy],
) -> None:
    client, proxy = proxied
    # Warm up: the next group is one request on the pooled connection, the one the proxy cuts.
    warm = {**DURABLE, "Idempotency-Key": "warm"}
    response = await client.post("/increment", json={"key": "w", "value": 1}, headers=warm)
    assert response.status == 204
    proxy.armed, proxy.refuse_after_cut = True, True
    keyed = {**DURABLE, "Idempotency-Key": "cut"}
    response = await client.post("/increment", json=ONE, headers=keyed)
    await problem(response, 503, "outcome-unknown")
    assert proxy.cuts == 1


async def test_backpressure_is_503_with_retry_after_on_every_path(replica: Any) -> None:
    client = await replica(max_pending_keys=2)
    for key in "ab":
        assert (await client.post("/increment", json={"key": key, "value": 1})).status == 202
    new = {"key": "c", "value": 1}
    three = {"increments": [{"key": "c", "value": 1}, {"key": "d", "value": 1}]}
    for path, body, headers in (
        ("/increment", new, {}),  # written behind, no key
        ("/increment", new, {"Idempotency-Key": "full-1"}),  # keyed
        ("/increments", three, {}),
        ("/increments", three, {"Idempotency-Key": "full-2"}),
        ("/increment", new, DURABLE),  # durable
        ("/increments", three, {**DURABLE, "Idempotency-Key": "full-3"}),
    ):
        await problem(await client.post(path, json=body, headers=headers), 503, "backpressure")


async def test_redis_down_on_the_session_routes_is_503_with_retry_after(
    client: Client, replica: Any
) -> None:
    cookie = await session_cookie(client)  # a live session, made while Redis was up
    down = await replica(redis_url=closed_redis())
    for path, body in (("/api/increment", ONE), ("/api/increments", BATCH)):
        for headers in ({}, {"Idempotency-Key": "k"}, DURABLE):
            response = await down.post(path, json=body, headers={**cookie, **headers})
            await problem(response, 503, "unavailable")
    # And the open routes, when INCREMENT_AUTH=session guards them.
    guarded = await replica(redis_url=closed_redis(), increment_auth="session")
    for path, body in (("/increment", ONE), ("/increments", BATCH)):
        await problem(await guarded.post(path, json=body, headers=cookie), 503, "unavailable")


# --- 503 for a dependency outage on the other routes ----------------------------------------


async def test_postgres_down_is_503_with_retry_after(client: Client, replica: Any) -> None:
    cookie = await session_cookie(client)
    down = await replica(database_url=closed_postgres())
    await problem(await down.get("/api/counters/x", headers=cookie), 503, "unavailable")
    credentials = {"email": f"new-{uuid.uuid4().hex[:12]}@example.com", "password": "p" * 12}
    await problem(await down.post("/api/users", json=credentials), 503, "unavailable")
    await problem(await down.post("/api/sessions", json=credentials), 503, "unavailable")


async def test_redis_down_is_503_with_retry_after(client: Client, replica: Any) -> None:
    cookie = await session_cookie(client)
    down = await replica(redis_url=closed_redis())
    credentials = {"email": f"new-{uuid.uuid4().hex[:12]}@example.com", "password": "p" * 12}
    for response in (
        await down.get("/api/sessions", headers=cookie),
        await down.get("/api/counters/x", headers=cookie),
        await down.delete("/api/sessions", headers=cookie),
        await down.post("/api/users", json=credentials),
        await down.post("/api/sessions", json=credentials),
    ):
        await problem(response, 503, "unavailable")


async def test_the_health_check_503_is_a_readiness_answer_without_retry_after(
    replica: Any,
) -> None:
    down = await replica(database_url=closed_postgres(), redis_url=closed_redis())
    for path in ("/api/health", "/health"):
        response = await down.get(path)
        assert response.status == 503
        assert (await response.json())["status"] == "fail"
        assert "Retry-After" not in response.headers


# --- every 503 and every 409 for a key in use, by construction ------------------------------


def problem_errors() -> list[type[errors.ProblemError]]:
    found: list[type[errors.ProblemError]] = []
    todo = [errors.ProblemError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo += kind.__subclasses__()
    return found


def test_every_503_and_the_409_for_a_key_in_use_carry_retry_after() -> None:
    kinds = [k for k in problem_errors() if k.status == 503 or k is errors.KeyInUse]
    assert {k.__name__ for k in kinds} >= {
        "ServiceUnavailable",
        "BackpressureError",
        "NotCommitted",
        "OutcomeUnknown",
        "KeyInUse",
    }
    for kind in kinds:
        made = kind(1) if kind is errors.BackpressureError else kind("detail")
        assert made.headers.get("Retry-After") == "1", kind
    # A given Retry-After wins, and the caller's headers are not changed.
    given = {"Retry-After": "7"}
    assert errors.ServiceUnavailable("x", headers=given).headers == {"Retry-After": "7"}
    assert errors.BackpressureError(retry_after=3).headers["Retry-After"] == "3"
    added = errors.OutcomeUnknown("x", headers={"X": "y"})
    assert added.headers == {"X": "y", "Retry-After": "1"}


# --- the OpenAPI document says so -------------------------------------------------------------


def test_the_openapi_document_declares_retry_after() -> None:
    from increment_service.openapi import document

    doc = document()
    retry_after = doc["components"]["responses"]["ProblemRetryAfter"]
    assert retry_after["headers"]["Retry-After"]["required"] is True
    ref = {"$ref": "#/components/responses/ProblemRetryAfter"}
    for path in ("/increment", "/api/increment", "/increments", "/api/increments"):
        responses = doc["paths"][path]["post"]["responses"]
        assert responses["409"] == responses["503"] == ref, path
        parameters = doc["paths"][path]["post"]["parameters"]
        key = next(p for p in parameters if p["name"] == "Idempotency-Key")
        assert '"abc";p=1' in key["description"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            answer = operation["responses"].get("503")
            if path in ("/api/health", "/health"):
                assert "headers" not in answer  # readiness, not a refused request
            elif answer is not None:
                assert answer == ref, (method, path)
