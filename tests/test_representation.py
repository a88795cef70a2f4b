"""Read-your-writes: ``Prefer: durable, return=representation`` answers each counter's running
total right after the request in its commit; a replay answers the same totals.

Real Postgres throughout: the store functions where the order inside one commit must be exact,
the HTTP routes for the answers.
"""

from __future__ import annotations

import asyncio
import datetime

import asyncpg
import pytest

from increment_service.client import IncrementClient
from increment_service.writebehind import Batch, Keyed, Totals, Unkeyed, apply_batch
from increment_service.writebehind.records import lookup_records
from tests.support.inprocess import MakeReplica, base_url
from tests.support.postgres import counters

pytestmark = pytest.mark.timeout(90)

INT64_MAX = 2**63 - 1
READ_YOUR_WRITES = {"Prefer": "durable, return=representation"}
APPLIED = "durable, return=representation"


def group(*requests: Unkeyed | Keyed, seq: int = 1) -> Batch:
    return Batch("g", seq, [], [], 0.0, requests=requests)


def asking(*items: tuple[str, int]) -> Unkeyed:
    return Unkeyed(items, representation=True)


async def commit_time(pg: asyncpg.Connection, key: str) -> datetime.datetime:
    at = await pg.fetchval("SELECT updated_at FROM counters WHERE key = $1", key)
    assert isinstance(at, datetime.datetime)
    return at


# --- at the store --------------------------------------------------------------------------


async def test_each_request_of_a_group_gets_its_own_running_totals(
    pg: asyncpg.Connection, clean: None
) -> None:
    """One sum (every running total fits): worked back from the counters' new totals."""
    await pg.execute("INSERT INTO counters VALUES ('a', 10, now())")
    batch = group(
        asking(("a", 2), ("b", 1), ("a", 1)),
        Unkeyed((("a", 100),)),  # did not ask: moves the totals, gets none
        asking(("b", 5), ("a", -3)),
    )
    applied = await apply_batch(pg, batch, 10)
    at = await commit_time(pg, "a")
    assert applied.totals == {
        0: Totals((("a", 13), ("b", 1)), at),
        2: Totals((("b", 6), ("a", 110)), at),
    }
    assert await counters(pg) == {"a": 110, "b": 6}


async def test_in_order_totals_leave_out_what_was_refused(
    pg: asyncpg.Connection, clean: None
) -> None:
    """Near the edge the group goes in order: a refused change has no total, and the totals
    of the requests after it do not count it."""
    await pg.execute("INSERT INTO counters VALUES ('c', $1, now())", INT64_MAX - 5)
    batch = group(asking(("c", 10)), asking(("c", -10), ("d", 1)), asking(("c", 3)))
    applied = await apply_batch(pg, batch, 10)
    at = await commit_time(pg, "c")
    assert applied.not_applied == {0: (0,)}
    assert applied.totals == {
        0: Totals((), at),
        1: Totals((("c", INT64_MAX - 15), ("d", 1)), at),
        2: Totals((("c", INT64_MAX - 12),), at),
    }


async def test_a_keyed_requests_totals_are_kept_with_its_key(
    pg: asyncpg.Connection, clean: None
) -> None:
    request = Keyed("open", "k", b"k" * 16, (("a", 4), ("a", 1)), durable=True, representation=True)
    first = await apply_batch(pg, group(Unkeyed((("a", 1),)), request), 10)
    at = await commit_time(pg, "a")
    assert first.totals == {1: Totals((("a", 6),), at)}
    found = await lookup_records(pg, [request.ident], 3600, 10)
    assert found[request.ident][0].totals == Totals((("a", 6),), at)
    # The retry of another group with the same key finds it recorded, totals and all.
    again = await apply_batch(pg, group(request, seq=2), 10)
    assert again.claimed == frozenset()
    assert again.recorded_before[0].totals == Totals((("a", 6),), at)
    assert await counters(pg) == {"a": 6}


# --- over HTTP -----------------------------------------------------------------------------


async def test_a_durable_increment_answers_its_counters(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    one = await client.post("/increment", json={"key": "k", "value": 5}, headers=READ_YOUR_WRITES)
    assert one.status == 200
    assert one.headers["Preference-Applied"] == APPLIED
    body = await one.json()
    at = (await commit_time(pg, "k")).isoformat()
    assert body == {"counters": [{"key": "k", "value": 5, "updatedAt": at}], "notApplied": []}
    batch = {
        "increments": [{"key": "a", "value": 1}, {"key": "k", "value": 2}, {"key": "a", "value": 3}]
    }
    many = await client.post("/increments", json=batch, headers=READ_YOUR_WRITES)
    assert many.status == 200
    at = (await commit_time(pg, "a")).isoformat()
    assert (await many.json())["counters"] == [
        {"key": "a", "value": 4, "updatedAt": at},
        {"key": "k", "value": 7, "updatedAt": at},
    ]


async def test_without_durable_the_preference_is_ignored(replica: MakeReplica) -> None:
    client = await replica()
    answer = await client.post(
        "/increment", json={"key": "k", "value": 5}, headers={"Prefer": "return=representation"}
    )
    assert answer.status == 202
    assert "Preference-Applied" not in answer.headers
    assert await answer.read() == b""


async def test_concurrent_callers_each_see_their_own_total(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    """However the requests are grouped, each +1 is a step of its own: the totals the callers
    are told are exactly 1 to N, each once."""
    client = await replica()
    n = 40
    answers = await asyncio.gather(
        *(
            client.post("/increment", json={"key": "same", "value": 1}, headers=READ_YOUR_WRITES)
            for _ in range(n)
        )
    )
    totals = []
    for answer in answers:
        assert answer.status == 200
        [counter] = (await answer.json())["counters"]
        totals.append(counter["value"])
    assert sorted(totals) == list(range(1, n + 1))
    assert await counters(pg) == {"same": n}


async def test_a_refused_item_has_no_total_and_is_named(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    await pg.execute("INSERT INTO counters VALUES ('edge', $1, now())", INT64_MAX - 5)
    client = await replica()
    batch = {"increments": [{"key": "edge", "value": 10}, {"key": "fine", "value": 1}]}
    answer = await client.post("/increments", json=batch, headers=READ_YOUR_WRITES)
    assert answer.status == 200
    body = await answer.json()
    assert [c["key"] for c in body["counters"]] == ["fine"]
    assert [(i["index"], i["key"]) for i in body["notApplied"]] == [(0, "edge")]


async def test_a_keyed_replay_answers_the_same_totals_on_every_replica(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    a, b = await replica(), await replica()
    keyed = {"Idempotency-Key": "ryw", **READ_YOUR_WRITES}
    first = await a.post("/increment", json={"key": "r", "value": 3}, headers=keyed)
    assert first.status == 200
    body = await first.json()
    # Other increments move the counter on; the replays still tell the first totals.
    assert (
        await a.post("/increment", json={"key": "r", "value": 10}, headers=READ_YOUR_WRITES)
    ).status == 200
    for client in (a, b, await replica()):
        again = await client.post("/increment", json={"key": "r", "value": 3}, headers=keyed)
        assert again.status == 200
        assert again.headers["Preference-Applied"] == APPLIED
        assert await again.json() == body
    # A replay that does not ask for the totals is told the durable answer without them.
    plain = await b.post(
        "/increment", json={"key": "r", "value": 3}, headers={"Idempotency-Key": "ryw"}
    )
    assert (plain.status, plain.headers["Preference-Applied"]) == (204, "durable")
    assert await counters(pg) == {"r": 13}


async def test_a_replay_of_an_answer_without_totals_does_not_make_them_up(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    a, b = await replica(), await replica()
    headers = {"Idempotency-Key": "plain-first", "Prefer": "durable"}
    assert (
        await a.post("/increment", json={"key": "p", "value": 1}, headers=headers)
    ).status == 204
    asking_now = {"Idempotency-Key": "plain-first", **READ_YOUR_WRITES}
    for client in (a, b):
        again = await client.post("/increment", json={"key": "p", "value": 1}, headers=asking_now)
        assert (again.status, again.headers["Preference-Applied"]) == (204, "durable")
    assert await counters(pg) == {"p": 1}


async def test_the_client_reads_its_writes(replica: MakeReplica, pg: asyncpg.Connection) -> None:
    served = await replica()
    async with IncrementClient(base_url(served)) as client:
        first = await client.increment("mine", 5, return_value=True)
        second = await client.increment("mine", 2, return_value=True)
        batch = await client.increments([("mine", 1), ("yours", 4)], return_value=True)
        # The same operation again (its key given): the same totals, though the counter moved.
        again = await client.increment(
            "mine", 5, return_value=True, idempotency_key=first.idempotency_key
        )
    assert (first.value, second.value) == (5, 7)
    assert batch.counters == {"mine": 8, "yours": 4}
    assert (again.value, again.counters) == (5, {"mine": 5})
    assert await counters(pg) == {"mine": 8, "yours": 4}
