"""Every fault the spec names, caused for real, each ending with an exact assertion.

No mocks: a Postgres cluster really stopped and started again, backends really terminated by
the server, a commit whose answer really never reaches the client (a TCP proxy cuts the line),
real SIGTERM and SIGKILL to a real service process, and a batch Postgres refuses for good (a
counter at the edge of bigint).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.settings import Settings
from tests.support.inprocess import Client, Proxied, base_url
from tests.support.load import Traffic
from tests.support.logs import applied_flushes, json_log_lines
from tests.support.metrics import app_metric
from tests.support.net import tcp_listeners
from tests.support.polling import eventually
from tests.support.postgres import (
    PgCluster,
    database_name,
    persisted,
    wait_until_no_other_backends,
    wait_until_persisted,
)
from tests.support.processes import MakeService, running

pytestmark = pytest.mark.timeout(60)

INT64_MAX = 2**63 - 1
MAX_VALUE = 2**53 - 1  # the largest increment the API accepts

# The service's own connections to the test database: every client backend but the asking one.
TERMINATE_SQL = """
SELECT count(*) FROM (
    SELECT pg_terminate_backend(pid) AS terminated
    FROM pg_stat_activity
    WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'
) AS t
WHERE terminated
"""


# --- helpers --------------------------------------------------------------------------------


async def increment(client: Client, key: str, value: int) -> None:
    response = await client.post("/increment", json={"key": key, "value": value})
    assert response.status == 202, await response.text()


def flush_records(records: list[logging.LogRecord]) -> list[tuple[int, str]]:
    """(seq, outcome) of every flush attempt logged by the write-behind, in order."""
    return [
        (getattr(r, "seq", -1), getattr(r, "outcome", "?"))
        for r in records
        if r.name == "increment_service.writebehind" and getattr(r, "event", None) == "flush"
    ]


# --- 1. Postgres stopped while traffic continues, then started again ----------------------


async def test_postgres_stopped_and_started_under_traffic_loses_nothing(
    cluster: PgCluster, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    # The suite's test settings, pointed at the cluster this test may stop.
    outage = dataclasses.replace(settings, database_url=cluster.url, replica_id="pg-outage")
    client = await aiohttp_client(create_app(outage))
    aggregator = client.app[appkeys.WRITE_BEHIND].aggregator

    async def some_persisted() -> bool:
        return bool(await persisted(cluster.url))

    async def health_ok() -> bool:
        return (await client.get("/api/health")).status == 200

    async with Traffic(
        base_url(client), lambda n: (f"outage-{n % 64}", 1 + n % 5), concurrency=8
    ) as traffic:
        # Before: increments are acknowledged and written behind as usual.
        await traffic.wait_for_acks(300)
        await eventually(some_persisted, "a first batch is persisted")

        await asyncio.to_thread(cluster.stop)
        stopped_at = len(traffic.acks)
        # While down: health says so, flushes fail, increments are still acknowledged.
        response = await client.get("/api/health")
        body = await response.json()
        assert response.status == 503, body
        assert body["status"] == "fail"
        assert body["checks"]["postgres"].startswith("error: "), body
        assert body["checks"]["redis"] == "ok"

        async def flushes_fail() -> bool:
            return await app_metric(client, "increment_flush_failures_total") >= 2

        await eventually(flushes_fail, "flushes fail while Postgres is down")
        await traffic.wait_for_acks(stopped_at + 300)
        assert aggregator.in_flight is not None, "the batch that failed is kept to be retried"

        await asyncio.to_thread(cluster.start)
        started_at = len(traffic.acks)
        # After: traffic continues and health recovers.
        await traffic.wait_for_acks(started_at + 300)
        await eventually(health_ok, "health is 200 again once Postgres is back")

    assert traffic.unknown() == []
    assert set(traffic.statuses()) == {202}
    assert traffic.acknowledged() == traffic.attempted()
    got = await wait_until_persisted(cluster.url, traffic.acknowledged())
    assert got == dict(traffic.acknowledged())
    assert await app_metric(client, "increment_flush_failures_total") > 0

    async def nothing_pending() -> bool:
        return await app_metric(client, "increment_pending_keys") == 0 and aggregator.is_empty

    await eventually(nothing_pending, "the replica holds nothing unpersisted")


# --- 2. The server kills the service's connections, repeatedly, while traffic runs ---------


async def test_connections_terminated_by_the_server_lose_and_double_nothing(
    client: Client, database_url: str, pg: asyncpg.Connection
) -> None:
    dbname = database_name(database_url)
    registry = client.app[appkeys.METRICS].registry

    def failures() -> float:
        return registry.get_sample_value("increment_flush_failures_total") or 0.0

    terminated = 0
    async with Traffic(
        base_url(client), lambda n: (f"term-{n % 100}", 1 + n % 3), concurrency=8
    ) as traffic:
        await traffic.wait_for_acks(100)
        # Kill every connection of the service, again and again, until flushes have been hit
        # (a kill that lands on an idle pooled connection only costs a reconnect).
        deadline = time.monotonic() + 30
        while failures() < 3 or terminated < 5:
            assert time.monotonic() < deadline, (terminated, failures())
            terminated += await pg.fetchval(TERMINATE_SQL, dbname)
            await asyncio.sleep(0.01)
        await traffic.wait_for_acks(len(traffic.acks) + 100)

    assert traffic.unknown() == []
    assert set(traffic.statuses()) == {202}
    got = await wait_until_persisted(database_url, traffic.acknowledged())
    assert got == dict(traffic.acknowledged())
    assert failures() >= 3
    aggregator = client.app[appkeys.WRITE_BEHIND].aggregator

    async def nothing_pending() -> bool:
        return aggregator.is_empty

    await eventually(nothing_pending, "the replica holds nothing unpersisted")


# --- 3. Ambiguous commit: the server commits, the client never hears back -----------------


async def test_retry_after_an_ambiguous_commit_is_a_no_op(
    proxied: Proxied,
    database_url: str,
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="increment_service.writebehind")
    client, write_behind = proxied.client, proxied.write_behind
    await proxied.warm_up()
    for key, value in (("a", 5), ("b", 7), ("a", 3)):
        await increment(client, key, value)

    await proxied.flush_with_the_answer_cut()
    batch = write_behind.aggregator.in_flight
    assert batch is not None, "the outcome is unknown: the batch is kept"
    assert (batch.seq, batch.keys, batch.deltas) == (2, ["a", "b"], [8, 7])
    # ...but the server had committed it:
    assert await persisted(database_url) == {"warm": 1, "a": 8, "b": 7}

    # The retry of the same (replica_id, seq) adds nothing.
    assert await write_behind.flush()
    assert write_behind.aggregator.is_empty
    assert proxied.proxy.cuts == 1
    assert await app_metric(client, "increment_flush_failures_total") == 1
    assert flush_records(caplog.records) == [(1, "applied"), (2, "error"), (2, "already-applied")]
    assert await persisted(database_url) == {"warm": 1, "a": 8, "b": 7}
    rows = await pg.fetch(
        "SELECT seq, count(*) AS n FROM applied_batches WHERE replica_id = $1 GROUP BY seq"
        " ORDER BY seq",
        write_behind.replica_id,
    )
    assert [(r["seq"], r["n"]) for r in rows] == [(1, 1), (2, 1)]


# --- 4. SIGTERM right after a burst -------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_right_after_a_burst_persists_everything(
    workers: int, make_service: MakeService, database_url: str
) -> None:
    shutdown_timeout = 10
    # Nothing may be persisted before SIGTERM, however slow the machine: the test holds a
    # SHARE lock on counters (reads go on, writes wait) from before the burst until SIGTERM
    # is sent, so a flush the timer starts meanwhile waits, and the shutdown path is what
    # persists the burst (the batch in flight, then the rest). No timing decides it.
    interval = 9
    service = make_service(
        FLUSH_INTERVAL_SECONDS=str(interval),
        SHUTDOWN_TIMEOUT_SECONDS=str(shutdown_timeout),
        WORKERS=str(workers),
        REPLICA_ID=f"sigterm-{workers}",
    )
    items = [(f"burst-{i % 700}", 1 + i % 9) for i in range(3500)]
    with running(service):

        async def all_workers_listen() -> bool:
            return tcp_listeners(service.port) == workers

        await eventually(all_workers_listen, f"{workers} workers listen", within=30)
        writes_wait = await asyncpg.connect(database_url)
        try:
            async with writes_wait.transaction():
                await writes_wait.execute("LOCK TABLE counters IN SHARE MODE")
                traffic = await Traffic(service.url, items, concurrency=32).run()
                before = await persisted(database_url)
                service.signal(signal.SIGTERM)
                signalled_at = time.monotonic()
        finally:
            await writes_wait.close()
        code = await asyncio.to_thread(service.wait, shutdown_timeout)
        print(
            f"SIGTERM with WORKERS={workers}: {len(traffic.acknowledged()) - len(before)} of "
            f"{len(traffic.acknowledged())} keys unflushed at SIGTERM, exit {code} after "
            f"{time.monotonic() - signalled_at:.2f}s"
        )

    assert code == 0, service.log()
    assert traffic.unknown() == []
    assert traffic.statuses() == {202: len(items)}
    assert before == {}, "the lock held every write back until SIGTERM"
    # Exited: everything acknowledged is in Postgres already, no waiting.
    assert await persisted(database_url) == dict(traffic.acknowledged())
    shutdowns = [e for e in json_log_lines(service.log()) if e.get("event") == "shutdown"]
    assert [e["msg"] for e in shutdowns] == [
        "shutdown: everything acknowledged is persisted"
    ] * workers


# --- 5. SIGKILL mid-traffic ---------------------------------------------------------------


async def test_sigkill_loses_at_most_the_unflushed_interval(
    make_service: MakeService, database_url: str
) -> None:
    interval = 1.0
    margin = 1.0
    service = make_service(FLUSH_INTERVAL_SECONDS=str(interval), REPLICA_ID="sigkill")

    async def three_flushes() -> bool:
        return len(applied_flushes(service.log())) >= 3

    try:
        service.start()
        # A distinct key per request, value 1: a persisted key is exactly one increment.
        async with Traffic(service.url, lambda n: (f"kill-{n:07d}", 1), concurrency=16) as traffic:
            await traffic.wait_for_acks(1)
            await eventually(three_flushes, "three batches applied under traffic", within=20)
            # Late in a flush interval, so the loss measured is close to the worst case (a kill
            # right after a flush would lose almost nothing and say little).
            await asyncio.sleep(0.8 * interval)
            killed_at = time.monotonic()
            service.signal(signal.SIGKILL)
            code = await asyncio.to_thread(service.wait, 10)
    finally:
        service.stop()
    assert code == -signal.SIGKILL

    # The killed service's backends finish whatever they were executing, then the table is
    # what SIGKILL left.
    assert await wait_until_no_other_backends(database_url) == []
    got = await persisted(database_url)
    acked_at = {s.key: s.answered_at for s in traffic.acks}

    assert set(got.values()) <= {1}
    assert set(got) <= set(traffic.attempted()), "persisted never exceeds attempted"
    old = {key for key, t in acked_at.items() if t < killed_at - (interval + margin)}
    missing_old = old - set(got)
    assert not missing_old, f"{len(missing_old)} acknowledged > {interval + margin}s before: lost"
    lost = {key: t for key, t in acked_at.items() if key not in got}
    oldest_lost_age = killed_at - min(lost.values()) if lost else 0.0
    print(
        f"SIGKILL loss window (FLUSH_INTERVAL_SECONDS={interval:g}): "
        f"{len(traffic.acks)} acknowledged, {len(got)} persisted, {len(lost)} acknowledged "
        f"but lost; the oldest lost one was acknowledged {oldest_lost_age:.3f}s before the kill"
    )
    assert oldest_lost_age <= interval + margin


# --- 6. A batch Postgres refuses for good must not stop the flusher -----------------------


async def test_counter_at_the_edge_of_bigint_is_rejected_and_the_flusher_carries_on(
    settings: Settings,
    database_url: str,
    pg: asyncpg.Connection,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="increment_service.writebehind")
    # Flushed explicitly, so both increments are surely in one batch.
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, flush_interval_seconds=9))
    )
    write_behind = client.app[appkeys.WRITE_BEHIND]
    near_max = 9223372036854775800
    await pg.execute(
        "INSERT INTO counters (key, value, updated_at)"
        " VALUES ('near-max', $1, now() - interval '1 hour')",
        near_max,
    )
    stamped = await pg.fetchval("SELECT updated_at FROM counters WHERE key = 'near-max'")

    await increment(client, "near-max", 100)  # would leave bigint
    await increment(client, "neighbour", 1)
    assert await write_behind.flush(), "the batch is settled, not retried forever"
    assert write_behind.aggregator.is_empty
    assert await persisted(database_url) == {"near-max": near_max, "neighbour": 1}
    row = await pg.fetchrow("SELECT value, updated_at FROM counters WHERE key = 'near-max'")
    assert row is not None
    assert (row["value"], row["updated_at"]) == (near_max, stamped)
    [applied] = [r for r in caplog.records if getattr(r, "event", None) == "flush"]
    [rejected] = [r for r in caplog.records if getattr(r, "event", None) == "overflow"]
    assert (getattr(applied, "outcome", None), getattr(applied, "keys", None)) == ("applied", 2)
    assert getattr(rejected, "seq", None) == getattr(applied, "seq", None)
    assert getattr(rejected, "rejected_keys", None) == ["near-max"]

    # The flusher carries on: later increments to both keys are applied.
    await increment(client, "near-max", -5)
    await increment(client, "neighbour", 2)
    assert await write_behind.flush()
    assert await persisted(database_url) == {"near-max": near_max - 5, "neighbour": 3}
    assert await app_metric(client, "increment_overflow_rejected_total") == 1
    assert await app_metric(client, "increment_flush_failures_total") == 0


async def test_a_delta_wider_than_bigint_is_applied_once_across_an_ambiguous_commit(
    proxied: Proxied, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1025 increments of 2**53-1 to one key sum past bigint within one interval. The stored
    total still fits (the counter starts at -2**62), so the spec says it applies; it travels
    as numeric in the same statement, and an ambiguous commit must not apply it twice."""
    caplog.set_level(logging.INFO, logger="increment_service.writebehind")
    client, write_behind = proxied.client, proxied.write_behind
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO counters VALUES ('deep', $1, now())", -(2**62))
    finally:
        await conn.close()
    await proxied.warm_up()
    items = [("deep", MAX_VALUE)] * 1025 + [("small", 1)]
    traffic = await Traffic(base_url(client), items, concurrency=16).run()
    assert traffic.statuses() == {202: len(items)}
    assert traffic.acknowledged()["deep"] > INT64_MAX

    await proxied.flush_with_the_answer_cut()
    assert await write_behind.flush()
    assert flush_records(caplog.records) == [(1, "applied"), (2, "error"), (2, "already-applied")]
    expected = {"warm": 1, "small": 1, "deep": -(2**62) + traffic.acknowledged()["deep"]}
    assert await persisted(database_url) == expected
    assert await app_metric(client, "increment_overflow_rejected_total") == 0
