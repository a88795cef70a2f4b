"""The HTTP surface end to end, in-process against real Postgres and Redis."""

from __future__ import annotations

import dataclasses

import asyncpg
import jsonschema
import pytest
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys, db
from increment_service.app import create_app
from increment_service.settings import Settings
from tests.support.api import signed_in
from tests.support.inprocess import Client, base_url
from tests.support.net import JSON, free_port
from tests.support.postgres import counters
from tests.support.problems import problem_type


async def test_increment_is_accepted_then_persisted(client: Client, pg: asyncpg.Connection) -> None:
    for value in (5, 7, -2):
        response = await client.post("/increment", json={"key": "apples", "value": value})
        assert response.status == 202
        assert await response.read() == b""
    before = await pg.fetchval("SELECT now()")  # the flush's transaction starts after this
    await client.app[appkeys.WRITE_BEHIND].flush()
    after = await pg.fetchval("SELECT clock_timestamp()")
    row = await pg.fetchrow("SELECT value, updated_at FROM counters WHERE key = 'apples'")
    assert row is not None
    assert row["value"] == 10
    assert before <= row["updated_at"] <= after, "stamped by the flush that applied it"


async def test_health_reports_each_dependency(client: Client) -> None:
    for path in ("/health", "/api/health"):
        response = await client.get(path)
        assert response.status == 200
        assert await response.json() == {
            "status": "ok",
            "checks": {"postgres": "ok", "redis": "ok", "writeBehind": "ok"},
        }
    live = await client.get("/livez")
    assert live.status == 200


async def test_health_is_503_when_dependencies_are_unreachable(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    closed = free_port()
    app = create_app(
        dataclasses.replace(
            settings,
            database_url=f"postgresql://postgres@127.0.0.1:{closed}/none",
            redis_url=f"redis://127.0.0.1:{closed}/0",
        )
    )
    client = await aiohttp_client(app)
    response = await client.get("/api/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "fail"
    assert body["checks"]["postgres"].startswith("error")
    assert body["checks"]["redis"].startswith("error")
    assert body["checks"]["writeBehind"] == "ok"
    # Increments are still taken: they wait in memory for Postgres to come back.
    assert (await client.post("/increment", json={"key": "a", "value": 1})).status == 202
    assert (await client.get("/livez")).status == 200


async def test_backpressure_refuses_new_keys_with_503_and_retry_after(
    aiohttp_client: AiohttpClient, settings: Settings, pg: asyncpg.Connection
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, max_pending_keys=3, flush_interval_seconds=9))
    )
    for key in "abc":
        assert (await client.post("/increment", json={"key": key, "value": 1})).status == 202
    refused = await client.post("/increment", json={"key": "d", "value": 1})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.content_type == "application/problem+json"
    assert await problem_type(refused) == "backpressure"
    # A key already pending is still counted.
    assert (await client.post("/increment", json={"key": "a", "value": 1})).status == 202
    health = await client.get("/api/health")
    assert health.status == 503
    assert (await health.json())["checks"]["writeBehind"].startswith("error")
    metrics = await (await client.get("/metrics")).text()
    assert "increment_backpressure_rejections_total 1.0" in metrics
    await client.app[appkeys.WRITE_BEHIND].flush()
    assert (await client.post("/increment", json={"key": "d", "value": 1})).status == 202
    await client.app[appkeys.WRITE_BEHIND].flush()
    rows = await pg.fetch("SELECT key, value FROM counters ORDER BY key")
    assert [(r["key"], r["value"]) for r in rows] == [("a", 2), ("b", 1), ("c", 1), ("d", 1)]


async def test_guarded_routes_need_a_session(client: Client) -> None:
    increment = await client.post("/api/increment", json={"key": "a", "value": 1})
    assert increment.status == 401
    assert increment.content_type == "application/problem+json"
    counter = await client.get("/api/counters/a")
    assert counter.status == 401
    assert client.app[appkeys.WRITE_BEHIND].aggregator.is_empty


async def test_increment_auth_session_guards_increment(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, increment_auth="session"))
    )
    assert (await client.post("/increment", json={"key": "a", "value": 1})).status == 401


async def test_metrics_count_requests_by_route_template(client: Client) -> None:
    for _ in range(3):
        await client.post("/increment", json={"key": "m", "value": 1})
    await client.post("/increment", json={"key": "m"})
    await client.get("/api/counters/some-raw-key")
    await client.get("/no/such/path")
    await client.app[appkeys.WRITE_BEHIND].flush()
    text = await (await client.get("/metrics")).text()
    assert "increments_total 3.0" in text
    series = 'http_request_duration_seconds_count{method="POST",route="/increment",'
    assert series + 'status_code="202"} 3.0' in text
    assert 'route="/increment",status_code="422"} 1.0' in text
    assert 'route="/api/counters/{key}"' in text
    assert "some-raw-key" not in text
    assert "/no/such/path" not in text
    assert 'route="unmatched"' in text
    assert "increment_flush_keys_count 1.0" in text
    assert "increment_pending_keys 0.0" in text


async def test_request_id_is_echoed_or_made(client: Client) -> None:
    given = await client.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/livez", headers={"X-Request-ID": "x" * 500})
    other = await client.get("/livez")
    assert len(made.headers["X-Request-ID"]) == 24
    assert made.headers["X-Request-ID"] != other.headers["X-Request-ID"]


async def test_openapi_documents_exactly_the_routes(client: Client) -> None:
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == routed


async def test_problem_bodies_match_the_documented_schema(client: Client) -> None:
    document = await (await client.get("/api/openapi.json")).json()
    schema = {**document["components"]["schemas"]["Problem"], "$defs": {}}
    for response in (
        await client.post("/increment", json={"key": 1}),
        await client.post("/increment", data=b"{", headers=JSON),
        await client.get("/increment"),
    ):
        jsonschema.validate(await response.json(content_type=None), schema)


def test_create_app_needs_both_urls(settings: Settings) -> None:
    with pytest.raises(ValueError, match="database_url and redis_url"):
        create_app(dataclasses.replace(settings, redis_url=None))


async def test_a_sum_too_big_for_bigint_is_rejected_and_the_rest_persisted(
    aiohttp_client: AiohttpClient, settings: Settings, pg: asyncpg.Connection
) -> None:
    # No background flush during the burst: the sum of one interval must leave bigint.
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, flush_interval_seconds=9))
    )
    big = 2**53 - 1
    for _ in range(1025):  # 1025 * (2^53 - 1) > 2^63 - 1 within one interval
        assert (await client.post("/increment", json={"key": "huge", "value": big})).status == 202
    assert (await client.post("/increment", json={"key": "fine", "value": 1})).status == 202
    await client.app[appkeys.WRITE_BEHIND].flush()
    assert await counters(pg) == {"fine": 1}
    text = await (await client.get("/metrics")).text()
    assert "increment_overflow_rejected_total 1.0" in text


@pytest.mark.parametrize("path", ["a%00", "a%00b", "%0a", "a%C2%85", "a%ED%A0%80"])
async def test_a_key_no_counter_can_have_is_404(client: Client, path: str) -> None:
    response = await client.get(f"/api/counters/{path}", headers=await signed_in(base_url(client)))
    assert response.status == 404
    assert response.content_type == "application/problem+json"


async def test_counters_while_postgres_is_down_are_503(
    aiohttp_client: AiohttpClient, client: Client, settings: Settings
) -> None:
    headers = await signed_in(base_url(client))
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    down = await aiohttp_client(create_app(dataclasses.replace(settings, database_url=closed)))
    response = await down.get("/api/counters/x", headers=headers)
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == "1"


async def test_counters_behind_a_lock_are_503_after_the_request_timeout(
    client: Client, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = await signed_in(base_url(client))
    monkeypatch.setattr(db, "REQUEST_TIMEOUT_SECONDS", 0.5)
    async with pg.transaction():
        await pg.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        response = await client.get("/api/counters/x", headers=headers)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    # The lock is gone: the pool's connection was not left waiting on it.
    assert (await client.get("/api/counters/x", headers=headers)).status == 404
