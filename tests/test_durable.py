"""Durable acknowledgement (``Prefer: durable``): a 204 only after the commit that holds it.

Real Postgres throughout: a table lock that holds a group back, a cluster really stopped, a
commit whose answer a proxy swallows, a counter at the edge of bigint, SIGTERM and SIGKILL to
a real service process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time

import aiohttp
import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.settings import Settings
from tests.support.inprocess import MakeReplica, Proxied
from tests.support.metrics import app_metric
from tests.support.polling import eventually
from tests.support.postgres import PgCluster, counters, persisted
from tests.support.problems import problem_type
from tests.support.processes import MakeService, running

pytestmark = pytest.mark.timeout(90)

DURABLE = {"Prefer": "durable"}
INT64_MAX = 2**63 - 1


async def test_a_durable_increment_is_committed_when_answered(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    response = await client.post("/increment", json={"key": "d", "value": 3}, headers=DURABLE)
    assert response.status == 204
    assert response.headers["Preference-Applied"] == "durable"
    assert await counters(pg) == {"d": 3}, "in Postgres before any flush of the timer"
    batch = await client.post(
        "/increments",
        json={"increments": [{"key": "d", "value": 1}, {"key": "e", "value": 2}]},
        headers={"Prefer": "respond-async, durable; level=1"},
    )
    assert batch.status == 204
    assert await counters(pg) == {"d": 4, "e": 2}
    # Without the preference: the write-behind, as always.
    assert (await client.post("/increment", json={"key": "d", "value": 1})).status == 202
    assert await counters(pg) == {"d": 4, "e": 2}


async def test_waiting_durable_requests_commit_together(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    responses = await asyncio.gather(
        *(
            client.post("/increment", json={"key": f"g{n % 7}", "value": 1}, headers=DURABLE)
            for n in range(60)
        )
    )
    assert [r.status for r in responses] == [204] * 60
    assert sum((await counters(pg)).values()) == 60
    groups = await app_metric(client, "increment_durable_group_size_count")
    assert groups < 60, "requests that waited together were committed together"
    assert await pg.fetchval(
        "SELECT count(*) FROM applied_batches WHERE replica_id LIKE '%/durable'"
    ) == int(groups)


async def test_postgres_down_before_a_group_is_sent_is_503_and_nothing_applied(
    cluster: PgCluster, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(
        create_app(
            dataclasses.replace(settings, database_url=cluster.url, flush_interval_seconds=9)
        )
    )
    await asyncio.to_thread(cluster.stop)
    started = time.monotonic()
    response = await client.post(
        "/increment",
        json={"key": "never", "value": 1},
        headers={**DURABLE, "Idempotency-Key": "down"},
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert await problem_type(response) == "not-committed"
    assert time.monotonic() - started >= settings.durable_timeout_seconds - 0.1
    await asyncio.to_thread(cluster.start)
    await asyncio.sleep(1.0)  # a group kept around would be sent by now
    assert await persisted(cluster.url) == {}
    # The key was not used up: the retry commits.
    retry = await client.post(
        "/increment",
        json={"key": "never", "value": 1},
        headers={**DURABLE, "Idempotency-Key": "down"},
    )
    assert retry.status == 204
    assert await persisted(cluster.url) == {"never": 1}


async def test_a_commit_whose_answer_is_lost_is_503_unknown_then_applied_once(
    proxied: Proxied, pg: asyncpg.Connection
) -> None:
    client, proxy = proxied.client, proxied.proxy
    keyed = {**DURABLE, "Idempotency-Key": "cut"}
    # Warm up: the pooled connection has the statement prepared, so the next group is one
    # request on it, the one the proxy lets through and whose answer it swallows.
    body = {"key": "w", "value": 1}
    assert (
        await client.post("/increment", json=body, headers={**keyed, "Idempotency-Key": "w"})
    ).status == 204
    proxy.armed, proxy.refuse_after_cut = True, True
    response = await client.post("/increment", json={"key": "c", "value": 5}, headers=keyed)
    assert response.status == 503
    assert await problem_type(response) == "outcome-unknown"
    assert proxy.cuts == 1
    assert (await counters(pg)).get("c") == 5, "the server had committed it"
    # The replica keeps retrying the group under its id; once Postgres is reachable again
    # the retry finds it applied and adds nothing.
    proxy.refusing = False
    write_behind = proxied.write_behind

    async def settled() -> bool:
        return not write_behind.committing

    await eventually(settled, "the group's outcome is known", within=10)
    # The client's retry, same key: the same success, not applied again.
    retry = await client.post("/increment", json={"key": "c", "value": 5}, headers=keyed)
    assert retry.status == 204
    assert await counters(pg) == {"w": 1, "c": 5}


async def test_an_item_that_would_leave_bigint_is_named_in_the_answer(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    await pg.execute("INSERT INTO counters VALUES ('edge', $1, now())", INT64_MAX - 5)
    client = await replica()
    response = await client.post(
        "/increments",
        json={"increments": [{"key": "edge", "value": 10}, {"key": "fine", "value": 1}]},
        headers=DURABLE,
    )
    assert response.status == 200, "never a plain 204"
    assert response.headers["Preference-Applied"] == "durable"
    body = await response.json()
    assert [(i["index"], i["key"]) for i in body["notApplied"]] == [(0, "edge")]
    assert await counters(pg) == {"edge": INT64_MAX - 5, "fine": 1}


async def test_a_key_waiting_for_its_commit_is_409_then_the_same_204(
    replica: MakeReplica, pg: asyncpg.Connection, database_url: str
) -> None:
    client = await replica(durable_timeout_seconds=3)
    keyed = {**DURABLE, "Idempotency-Key": "slow"}
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        first = asyncio.ensure_future(
            client.post("/increment", json={"key": "s", "value": 1}, headers=keyed)
        )
        write_behind = client.app[appkeys.WRITE_BEHIND]

        async def waiting() -> bool:
            return write_behind.waiting_durably(("open", "slow"))

        await eventually(waiting, "the first request waits for its commit", every=0.01)
        second = await client.post("/increment", json={"key": "s", "value": 1}, headers=keyed)
        assert second.status == 409
        assert await problem_type(second) == "idempotency-key-in-use"
        plain = await client.post(
            "/increment", json={"key": "s", "value": 1}, headers={"Idempotency-Key": "slow"}
        )
        assert plain.status == 409
        await transaction.rollback()
    finally:
        await holder.close()
    assert (await first).status == 204
    third = await client.post("/increment", json={"key": "s", "value": 1}, headers=keyed)
    assert third.status == 204
    other = await client.post("/increment", json={"key": "s", "value": 2}, headers=keyed)
    assert other.status == 422
    assert await counters(pg) == {"s": 1}


async def test_a_durable_204_survives_sigkill_of_the_replica(
    make_service: MakeService, database_url: str
) -> None:
    service = make_service(FLUSH_INTERVAL_SECONDS="9")
    with running(service):
        async with aiohttp.ClientSession() as session:
            for n in range(20):
                async with session.post(
                    service.url + "/increment",
                    json={"key": "survivor", "value": 1},
                    headers={**DURABLE, "Idempotency-Key": f"k{n}"},
                ) as response:
                    assert response.status == 204
            # And one written behind, acknowledged but not committed.
            async with session.post(
                service.url + "/increment", json={"key": "lost", "value": 1}
            ) as response:
                assert response.status == 202
        service.signal(signal.SIGKILL)
        service.wait(10)
    assert await persisted(database_url) == {"survivor": 20}


async def test_sigterm_answers_every_waiting_durable_request_before_exit(
    make_service: MakeService, database_url: str
) -> None:
    durable_timeout, shutdown_timeout = 2.0, 6.0
    service = make_service(
        DURABLE_TIMEOUT_SECONDS=str(durable_timeout),
        SHUTDOWN_TIMEOUT_SECONDS=str(shutdown_timeout),
    )
    holder = await asyncpg.connect(database_url)
    with running(service):
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        async with aiohttp.ClientSession() as session:

            async def send(n: int) -> tuple[int, str]:
                async with session.post(
                    service.url + "/increment",
                    json={"key": "term", "value": 1},
                    headers={**DURABLE, "Idempotency-Key": f"t{n}"},
                ) as response:
                    body = await response.read()
                    return response.status, body.decode()

            # The first request's group is sent and waits on the lock; only then the others
            # come, and wait for the next group, which is not sent while the first is out.
            sending = [asyncio.ensure_future(send(0))]

            async def first_group_waits() -> bool:
                return bool(
                    await holder.fetchval(
                        "SELECT count(*) FROM pg_locks"
                        " WHERE NOT granted AND relation = 'counters'::regclass"
                    )
                )

            await eventually(first_group_waits, "the first durable group waits on the lock")
            sending += [asyncio.ensure_future(send(n)) for n in range(1, 12)]
            await asyncio.sleep(0.5)  # they are in, waiting for the next group
            stopped_at = time.monotonic()
            service.signal(signal.SIGTERM)
            answers = await asyncio.gather(*sending)
            code = await asyncio.to_thread(service.wait, shutdown_timeout + 5)
            took = time.monotonic() - stopped_at
        await transaction.rollback()
    await holder.close()
    assert code == 0, service.log()[-2000:]
    assert took <= shutdown_timeout + 1
    # Every one answered: the first group was sent and is stuck behind the lock ("outcome
    # unknown"); the others waited for the next group, never sent ("not committed").
    assert [status for status, _ in answers] == [503] * 12
    kinds = [
        "outcome-unknown" if "outcome-unknown" in body else "not-committed"
        for _, body in answers
        if "outcome-unknown" in body or "not-committed" in body
    ]
    assert kinds == ["outcome-unknown"] + ["not-committed"] * 11
    # Unknown, honestly: only those may have been applied, whatever the server did later.
    await asyncio.sleep(0.5)
    assert (await persisted(database_url)).get("term", 0) <= kinds.count("outcome-unknown")
