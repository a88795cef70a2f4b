"""Every answer tells the truth about what was applied, on every replica.

- A replay tells the first answer (the key's record keeps it): the same 200 body and indexes
  from every replica and across restarts; a durable retry of a 202 is told what was committed.
- Overflow is per request, in commit order: a request that fits alone is never refused for a
  neighbour in its group, and within a timer batch keyed requests come first, the sums last.
- 422 only when the owner of a key is known; while it is undecided, 409 with Retry-After.
- A replica's memory of a key ends at its record time plus the TTL, and a replay does not
  extend it.

Real Postgres throughout; the store functions are driven directly where an order must be
exact, and the HTTP routes where an answer is the point.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.settings import Settings, SettingsError
from increment_service.writebehind import (
    Aggregator,
    Batch,
    Keyed,
    Recorded,
    Unkeyed,
    apply_batch,
)
from increment_service.writebehind.clock import PostgresClock
from tests.support.fakeclock import FakeClock
from tests.support.inprocess import Client, MakeReplica
from tests.support.metrics import app_metric
from tests.support.polling import eventually
from tests.support.postgres import PgCluster, counters, persisted
from tests.support.problems import problem_type

pytestmark = pytest.mark.timeout(90)

INT64_MAX = 2**63 - 1
DURABLE = {"Prefer": "durable"}
EDGE_BATCH = {"increments": [{"key": "edge", "value": 10}, {"key": "fine", "value": 1}]}


def keyed(key: str, durable: bool = False) -> dict[str, str]:
    return {"Idempotency-Key": key, **(DURABLE if durable else {})}


async def flush(*clients: Client) -> None:
    for client in clients:
        assert await client.app[appkeys.WRITE_BEHIND].flush()


async def at_the_edge(pg: asyncpg.Connection, key: str = "edge") -> None:
    await pg.execute("INSERT INTO counters VALUES ($1, $2, now())", key, INT64_MAX - 5)


# --- in order, at the store ----------------------------------------------------------------


async def test_the_requests_of_a_group_apply_in_order_each_as_if_alone(
    pg: asyncpg.Connection, clean: None
) -> None:
    """+10 then -10 on a counter at MAX-5: the first would leave bigint and is refused, the
    second fits and is applied (summed together they would both have passed)."""
    await at_the_edge(pg, "c")
    group = (Unkeyed((("c", 10),)), Unkeyed((("c", -10), ("other", 1))))
    applied = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert applied.not_applied == {0: (0,)}
    assert await counters(pg) == {"c": INT64_MAX - 15, "other": 1}
    # The other way round, both fit, in order.
    group = (Unkeyed((("c", -10),)), Unkeyed((("c", 10),)))
    applied = await apply_batch(pg, Batch("g", 2, [], [], 0.0, requests=group), 10)
    assert applied.not_applied == {}
    assert await counters(pg) == {"c": INT64_MAX - 15, "other": 1}


async def test_in_a_timer_batch_keyed_requests_come_first_and_the_sums_last(
    pg: asyncpg.Connection, clean: None
) -> None:
    await at_the_edge(pg, "c")
    request = Keyed("open", "first", b"f" * 16, (("c", 10), ("d", 1)))
    batch = Batch("t", 1, ["c"], [-10], 0.0, requests=(request,))
    applied = await apply_batch(pg, batch, 10)
    assert applied.claimed == {0}
    assert applied.not_applied == {0: (0,)}, "the keyed +10 came first: refused"
    assert applied.rejected == [], "then the summed -10: applied"
    assert await counters(pg) == {"c": INT64_MAX - 15, "d": 1}
    # The key's record says what was not applied, for every retry.
    assert await pg.fetchval("SELECT not_applied FROM idempotency_keys") == [0]


async def test_a_new_counter_takes_requests_in_order_until_one_does_not_fit(
    pg: asyncpg.Connection, clean: None
) -> None:
    group = tuple(Unkeyed((("n", 2**62),)) for _ in range(3))
    applied = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert applied.not_applied == {1: (0,), 2: (0,)}
    assert await counters(pg) == {"n": 2**62}
    # Every request refused: no counter appears.
    group = (Unkeyed((("m", 2**62),)), Unkeyed((("m", 2**62),)))
    await pg.execute("INSERT INTO counters VALUES ('m', $1, now())", INT64_MAX)
    applied = await apply_batch(pg, Batch("g", 2, [], [], 0.0, requests=group), 10)
    assert applied.not_applied == {0: (0,), 1: (0,)}
    assert (await counters(pg))["m"] == INT64_MAX


async def test_a_retry_of_an_applied_batch_reads_back_what_it_did_not_apply(
    pg: asyncpg.Connection, clean: None
) -> None:
    await at_the_edge(pg, "c")
    group = (Unkeyed((("c", 10),)), Keyed("open", "k", b"k" * 16, (("c", -10), ("c", 10)), True))
    first = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert first.fresh
    assert first.not_applied == {0: (0,)}
    again = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert not again.fresh
    assert again.not_applied == first.not_applied
    assert again.recorded_before == {1: Recorded(b"k" * 16, durable=True)}
    assert await counters(pg) == {"c": INT64_MAX - 5}


async def test_a_group_of_plain_requests_records_its_refusals_in_its_one_statement(
    pg: asyncpg.Connection, clean: None
) -> None:
    """Requests without keys that share no counter: one statement, no transaction of its
    own, and a retry of it reads back what it did not apply."""
    await at_the_edge(pg, "c")
    group = (Unkeyed((("c", 10), ("a", 1), ("c", 1))), Unkeyed((("b", 2),)))
    first = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert first.not_applied == {0: (0, 2)}
    again = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=group), 10)
    assert (again.fresh, again.not_applied) == (False, {0: (0, 2)})
    assert await counters(pg) == {"c": INT64_MAX - 5, "a": 1, "b": 2}


async def test_a_group_whose_running_totals_fit_is_one_sum_and_its_retry_adds_nothing(
    pg: asyncpg.Connection, clean: None
) -> None:
    """Plain requests sharing a counter go as one sum checked against their running totals
    (inorder.running_bounds): at either edge the check refuses the sum when a running total
    would leave bigint, though the sum itself fits, and the group goes in order instead."""
    await pg.execute(
        "INSERT INTO counters VALUES ('hi', $1, now()), ('lo', $2, now())",
        INT64_MAX - 5,
        -(2**63) + 5,
    )
    fits = (Unkeyed((("hi", 5), ("lo", -5))), Unkeyed((("hi", -7), ("lo", 7), ("new", 3))))
    applied = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=fits), 10)
    assert (applied.fresh, applied.claimed, applied.not_applied) == (True, frozenset({0, 1}), {})
    expected = {"hi": INT64_MAX - 7, "lo": -(2**63) + 7, "new": 3}
    assert await counters(pg) == expected
    again = await apply_batch(pg, Batch("g", 1, [], [], 0.0, requests=fits), 10)
    assert (again.fresh, again.not_applied) == (False, {})
    assert await counters(pg) == expected
    # Now 7 from each edge: +8 first would leave bigint (up, then down, sums to -1 and fits).
    over = (Unkeyed((("hi", 8), ("lo", -8))), Unkeyed((("hi", -9), ("lo", 9))))
    applied = await apply_batch(pg, Batch("g", 2, [], [], 0.0, requests=over), 10)
    assert applied.not_applied == {0: (0, 1)}
    assert await counters(pg) == {"hi": INT64_MAX - 16, "lo": -(2**63) + 16, "new": 3}


# --- answers over HTTP -------------------------------------------------------------------


async def test_a_durable_request_is_not_refused_for_a_neighbour_in_its_group(
    replica: MakeReplica, pg: asyncpg.Connection, database_url: str
) -> None:
    """Two durable requests committed in one group: +10 (does not fit alone: refused) and -10
    (fits alone: applied, answered 204), not refused together for their sum."""
    await at_the_edge(pg)
    client = await replica()
    committer = client.app[appkeys.WRITE_BEHIND].committer
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        # A first group, held back by the lock; the next two wait together behind it.
        blocker = asyncio.ensure_future(
            client.post("/increment", json={"key": "x", "value": 1}, headers=DURABLE)
        )

        async def first_in_flight() -> bool:
            return committer.committing

        await eventually(first_in_flight, "the first group is on its way", every=0.01)
        up = asyncio.ensure_future(
            client.post("/increment", json={"key": "edge", "value": 10}, headers=DURABLE)
        )
        down = asyncio.ensure_future(
            client.post("/increment", json={"key": "edge", "value": -10}, headers=DURABLE)
        )

        async def both_waiting() -> bool:
            return committer.waiting_items == 2

        await eventually(both_waiting, "both wait for the next group", every=0.01)
        await transaction.rollback()
    finally:
        await holder.close()
    assert (await blocker).status == 204
    refused, applied = await up, await down
    assert refused.status == 200
    assert [(i["index"], i["key"]) for i in (await refused.json())["notApplied"]] == [(0, "edge")]
    assert applied.status == 204
    assert await counters(pg) == {"edge": INT64_MAX - 15, "x": 1}


async def test_a_replay_tells_the_first_durable_answer_on_every_replica(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    await at_the_edge(pg)
    a, b = await replica(), await replica()
    first = await a.post("/increments", json=EDGE_BATCH, headers=keyed("r", durable=True))
    assert first.status == 200
    body = await first.json()
    assert [(i["index"], i["key"]) for i in body["notApplied"]] == [(0, "edge")]
    retries: list[tuple[Client, dict[str, str]]] = [
        (a, keyed("r", durable=True)),  # the replica that answered
        (b, keyed("r", durable=True)),  # another: it reads the key's record
        (a, keyed("r")),  # a plain retry, where the key is known: the durable answer
        (b, keyed("r")),  # ...and where it was looked up
    ]
    for client, headers in retries:
        again = await client.post("/increments", json=EDGE_BATCH, headers=headers)
        assert again.status == 200, headers
        assert again.headers["Preference-Applied"] == "durable"
        assert await again.json() == body
    restarted = await replica()
    again = await restarted.post("/increments", json=EDGE_BATCH, headers=keyed("r", durable=True))
    assert (again.status, await again.json()) == (200, body)
    assert await counters(pg) == {"edge": INT64_MAX - 5, "fine": 1}


async def test_a_durable_retry_of_a_202_is_told_what_was_committed(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    await at_the_edge(pg)
    a, b = await replica(), await replica()
    assert (await a.post("/increments", json=EDGE_BATCH, headers=keyed("w"))).status == 202
    await flush(a)  # the flush refuses the edge item
    for client in (a, b):
        told = await client.post("/increments", json=EDGE_BATCH, headers=keyed("w", True))
        assert told.status == 200
        assert [(i["index"], i["key"]) for i in (await told.json())["notApplied"]] == [(0, "edge")]
    # A plain retry is told what the first was told: 202.
    assert (await a.post("/increments", json=EDGE_BATCH, headers=keyed("w"))).status == 202
    assert await counters(pg) == {"edge": INT64_MAX - 5, "fine": 1}


async def test_a_durable_retry_of_a_pending_202_moves_it_into_a_durable_group(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    body = {"key": "p", "value": 1}
    assert (await client.post("/increment", json=body, headers=keyed("p"))).status == 202
    durable = await client.post("/increment", json=body, headers=keyed("p", durable=True))
    assert durable.status == 204
    assert await counters(pg) == {"p": 1}, "committed before any flush of the timer"
    await flush(client)
    assert await counters(pg) == {"p": 1}, "and not again by the timer"
    plain = await client.post("/increment", json=body, headers=keyed("p"))
    assert plain.status == 202, "the first answer was a 202"


@pytest.mark.parametrize("settles", [True, False], ids=["settled", "not-in-time"])
async def test_a_durable_retry_of_a_request_in_flight_waits_for_its_batch(
    replica: MakeReplica, pg: asyncpg.Connection, database_url: str, settles: bool
) -> None:
    """The timer's batch holding the request is on its way: the durable retry is told that
    batch's outcome once it settles, or 503 outcome-unknown if it does not within
    DURABLE_TIMEOUT_SECONDS (and the batch still applies it, once)."""
    client = await replica(durable_timeout_seconds=2)
    write_behind = client.app[appkeys.WRITE_BEHIND]
    body = {"key": "f", "value": 1}
    assert (await client.post("/increment", json=body, headers=keyed("flight"))).status == 202
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        flushing = asyncio.ensure_future(write_behind.flush())

        async def in_flight() -> bool:
            return write_behind.aggregator.in_flight_holds(("open", "flight"))

        await eventually(in_flight, "the request is in the timer's batch", every=0.01)
        retry = asyncio.ensure_future(
            client.post("/increment", json=body, headers=keyed("flight", durable=True))
        )
        if settles:
            await asyncio.sleep(0.2)  # the retry waits on the batch (any moment will do)
            await transaction.rollback()
        else:
            answer = await retry
            await transaction.rollback()
    finally:
        await holder.close()
    assert await flushing
    if settles:
        answer = await retry
        assert answer.status == 204
        assert answer.headers["Preference-Applied"] == "durable"
    else:
        assert answer.status == 503
        assert await problem_type(answer) == "outcome-unknown"
    assert await counters(pg) == {"f": 1}


async def test_the_real_retry_wins_over_another_body_held_here(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    """Replica b holds another body under the key (a client bug, or a collision in the open
    scope); the request that owns the key was committed on a. Its retry on b is told the truth
    (committed), and b drops the body it held."""
    a, b = await replica(), await replica()
    stray = await b.post("/increment", json={"key": "k", "value": 100}, headers=keyed("owned"))
    assert stray.status == 202
    owner = {"key": "k", "value": 1}
    assert (await a.post("/increment", json=owner, headers=keyed("owned", True))).status == 204
    retry = await b.post("/increment", json=owner, headers=keyed("owned"))
    assert retry.status == 204, "the owner's first answer was durable"
    assert retry.headers["Preference-Applied"] == "durable"
    await flush(b)
    assert await counters(pg) == {"k": 1}
    assert await app_metric(b, 'increment_idempotency_conflicts_total{stage="request"}') == 1
    again = await b.post("/increment", json={"key": "k", "value": 100}, headers=keyed("owned"))
    assert again.status == 422
    assert await problem_type(again) == "idempotency-key-reused"


async def test_another_body_with_no_committed_owner_is_409_until_the_flush(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    first = {"key": "u", "value": 1}
    assert (await client.post("/increment", json=first, headers=keyed("u"))).status == 202
    other = {"key": "u", "value": 2}
    for headers in (keyed("u"), keyed("u", durable=True)):
        undecided = await client.post("/increment", json=other, headers=headers)
        assert undecided.status == 409
        assert await problem_type(undecided) == "idempotency-key-in-use"
        assert 1 <= int(undecided.headers["Retry-After"]) <= 9  # the replica's flush interval
    await flush(client)
    decided = await client.post("/increment", json=other, headers=keyed("u"))
    assert decided.status == 422
    assert await counters(pg) == {"u": 1}


async def test_another_body_held_here_with_postgres_down_is_503_with_retry_after(
    cluster: PgCluster, settings: Settings, aiohttp_client: AiohttpClient
) -> None:
    """Whose the key is must come from Postgres; unreachable, the answer is a 503 to retry,
    never a guess, and the body held here stays as it was."""
    client = await aiohttp_client(
        create_app(
            dataclasses.replace(settings, database_url=cluster.url, flush_interval_seconds=9)
        )
    )
    held = {"key": "h", "value": 1}
    assert (await client.post("/increment", json=held, headers=keyed("down"))).status == 202
    await asyncio.to_thread(cluster.stop)
    other = await client.post("/increment", json={"key": "h", "value": 2}, headers=keyed("down"))
    assert other.status == 503
    assert other.headers["Retry-After"] == "1"
    await asyncio.to_thread(cluster.start)
    assert await client.app[appkeys.WRITE_BEHIND].flush()
    assert await persisted(cluster.url) == {"h": 1}


# --- the TTL ------------------------------------------------------------------------------


def test_a_ttl_below_a_minute_is_refused(settings: Settings) -> None:
    with pytest.raises(SettingsError, match="IDEMPOTENCY_TTL_SECONDS"):
        dataclasses.replace(settings, idempotency_ttl_seconds=59)
    assert dataclasses.replace(settings, idempotency_ttl_seconds=60).idempotency_ttl_seconds == 60


def test_a_replicas_memory_of_a_key_ends_at_its_record_time_plus_the_ttl() -> None:
    clock = FakeClock()
    aggregator = Aggregator("r", 10, clock=clock, idempotency_ttl=100.0)
    record = Recorded(b"f" * 16)
    aggregator.remember(("open", "a"), record)
    aggregator.remember(("open", "b"), record, age=60.0)  # found recorded a minute ago
    clock.now += 50
    aggregator.remember(("open", "a"), record)  # a replay: no extension
    assert aggregator.recorded(("open", "a")) == record
    assert aggregator.recorded(("open", "b")) is None, "40 s of its TTL were left"
    clock.now += 50
    assert aggregator.recorded(("open", "a")) is None


def test_the_lock_statement_is_skipped_only_surely_away_from_a_bucket_boundary() -> None:
    """Keys are locked within BOUNDARY_SECONDS of a bucket boundary (Postgres decides, in the
    statement); the service skips that statement only when its view of Postgres's clock puts
    it more than that and a margin away."""
    clock = PostgresClock()
    assert not clock.far_from_a_boundary(3600), "Postgres's clock not seen yet: lock"

    def at(seconds_into_bucket: float) -> bool:
        bucket_start = 1_000_000 * 3600.0
        clock.offset = bucket_start + seconds_into_bucket - time.time()
        return clock.far_from_a_boundary(3600)

    assert at(1800)
    for near in (0, 30, 60, 85, 3600 - 85, 3600 - 60, 3600 - 1):
        assert not at(near), near
    assert at(95)
    assert at(3600 - 95)
    clock.saw(time.time() + 12.5)
    assert clock.offset is not None
    assert 12 < clock.offset < 13
