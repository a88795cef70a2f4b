"""Batches and Idempotency-Key: applied at most once per key, across replicas and restarts.

Every test runs against real Postgres (and Redis for the session routes). A second
``create_app`` on the same database is another replica; a new one is a restarted replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

from increment_service import appkeys
from increment_service.validation.bodies import MAX_BODY_BYTES
from increment_service.validation.increments import MAX_BATCH_BODY_BYTES, MAX_BATCH_ITEMS
from increment_service.writebehind import Batch, Keyed, Recorded, apply_batch
from tests.support.api import signed_in
from tests.support.inprocess import Client, MakeReplica, base_url
from tests.support.metrics import app_metric
from tests.support.net import JSON, chunked_increment
from tests.support.postgres import counters
from tests.support.problems import problem_type


def key_header(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def flush(*clients: Client) -> None:
    for client in clients:
        assert await client.app[appkeys.WRITE_BEHIND].flush()


# --- batches --------------------------------------------------------------------------------


async def test_a_batch_is_applied_whole_and_repeated_keys_are_summed(
    client: Client, pg: asyncpg.Connection
) -> None:
    body = {
        "increments": [{"key": "a", "value": 1}, {"key": "b", "value": 5}, {"key": "a", "value": 2}]
    }
    response = await client.post("/increments", json=body)
    assert response.status == 202
    assert await response.read() == b""
    await flush(client)
    assert await counters(pg) == {"a": 3, "b": 5}
    assert await app_metric(client, "increments_total") == 3


async def test_a_bad_item_anywhere_refuses_the_whole_batch(
    client: Client, pg: asyncpg.Connection
) -> None:
    items: list[Any] = [{"key": f"k{n}", "value": n} for n in range(MAX_BATCH_ITEMS)]
    items[999] = {"key": "k999", "value": 1.5}
    items[3] = {"key": "", "value": 1, "extra": True}
    response = await client.post("/increments", json={"increments": items})
    assert response.status == 422
    problem = await response.json(content_type=None)
    pointers = sorted(error["pointer"] for error in problem["errors"])
    assert pointers == ["/increments/3/extra", "/increments/3/key", "/increments/999/value"]
    await flush(client)
    assert await counters(pg) == {}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"increments": []}, 422),
        ({"increments": [{"key": "a", "value": 1}] * (MAX_BATCH_ITEMS + 1)}, 422),
        ({"increments": {"key": "a", "value": 1}}, 422),
        ({"increments": [1]}, 422),
        ({"increments": [{"key": "a", "value": 1}], "more": 1}, 422),
        ([{"key": "a", "value": 1}], 422),
    ],
)
async def test_batches_out_of_shape_are_refused(
    client: Client, pg: asyncpg.Connection, body: Any, status: int
) -> None:
    response = await client.post("/increments", json=body)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    await flush(client)
    assert await counters(pg) == {}


async def test_a_batch_over_128_kib_is_413_and_a_single_increment_keeps_4_kib(
    client: Client, pg: asyncpg.Connection
) -> None:
    padding = "x" * 200
    items = [{"key": f"{padding}{n}", "value": 1} for n in range(MAX_BATCH_ITEMS)]
    body = ('{"increments": ' + str(items).replace("'", '"') + "}").encode()
    assert len(body) > MAX_BATCH_BODY_BYTES
    assert (await client.post("/increments", data=body, headers=JSON)).status == 413

    def single(size: int) -> bytes:
        """A single increment of exactly ``size`` bytes (padded with JSON whitespace)."""
        head, tail = b'{"key": "kib",', b'"value": 1}'
        return head + b" " * (size - len(head) - len(tail)) + tail

    assert len(single(MAX_BODY_BYTES)) == MAX_BODY_BYTES == 4096
    exact = await client.post("/increment", data=single(MAX_BODY_BYTES), headers=JSON)
    assert exact.status == 202, "exactly 4 KiB is kept"
    over = await client.post("/increment", data=single(MAX_BODY_BYTES + 1), headers=JSON)
    assert over.status == 413, "one byte more is not"
    chunked = chunked_increment(pad_kib=8)
    assert (await client.post("/increment", data=chunked, headers=JSON)).status == 413
    await flush(client)
    assert await counters(pg) == {"kib": 1}


async def test_a_batch_over_max_pending_keys_applies_nothing(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica(max_pending_keys=10)
    assert (await client.post("/increment", json={"key": "z", "value": 1})).status == 202
    items = [{"key": f"k{n}", "value": 1} for n in range(10)]  # 10 new keys + 1 pending: 11
    refused = await client.post("/increments", json={"increments": items})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    keyed = await client.post("/increments", json={"increments": items}, headers=key_header("full"))
    assert keyed.status == 503
    await flush(client)
    assert await counters(pg) == {"z": 1}
    # The 503 did not use the key up.
    assert (
        await client.post("/increments", json={"increments": items}, headers=key_header("full"))
    ).status == 202
    await flush(client)
    assert await counters(pg) == {"z": 1, **{f"k{n}": 1 for n in range(10)}}


# --- Idempotency-Key ------------------------------------------------------------------------


async def test_a_retry_on_the_same_replica_is_the_same_202_and_applied_once(
    client: Client, pg: asyncpg.Connection
) -> None:
    for _ in range(3):
        response = await client.post(
            "/increment", json={"key": "a", "value": 5}, headers=key_header("op-1")
        )
        assert response.status == 202
    await flush(client)
    for _ in range(2):  # after the commit too
        response = await client.post(
            "/increment", json={"key": "a", "value": 5}, headers=key_header("op-1")
        )
        assert response.status == 202
    await flush(client)
    assert await counters(pg) == {"a": 5}
    assert await app_metric(client, 'increment_idempotent_replays_total{stage="request"}') == 4
    assert await app_metric(client, "increments_total") == 5 - 4


async def test_the_same_key_on_two_replicas_in_one_interval_is_applied_once(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    a, b = await replica(), await replica()
    for client in (a, b):
        response = await client.post(
            "/increments",
            json={"increments": [{"key": "x", "value": 2}, {"key": "y", "value": 3}]},
            headers=key_header("shared"),
        )
        assert response.status == 202
    # Both batches at once: the two statements meet on the key's unique index.
    await asyncio.gather(flush(a), flush(b))
    assert await counters(pg) == {"x": 2, "y": 3}
    replays = [
        await app_metric(c, 'increment_idempotent_replays_total{stage="flush"}') for c in (a, b)
    ]
    assert sorted(replays) == [0, 1]


async def test_another_body_under_a_used_key_is_never_applied(
    replica: MakeReplica, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await replica(), await replica()
    assert (
        await a.post("/increment", json={"key": "a", "value": 1}, headers=key_header("k"))
    ).status == 202
    # This replica holds the key, not committed yet: whose it is is undecided until its next
    # flush (at most the replica's flush interval, 9 s, away): 409, retry then.
    undecided = await a.post("/increment", json={"key": "a", "value": 2}, headers=key_header("k"))
    assert undecided.status == 409
    assert (await undecided.json(content_type=None))["type"].endswith(":idempotency-key-in-use")
    assert 1 <= int(undecided.headers["Retry-After"]) <= 9
    await flush(a)
    # Settled here: the owner is known, and it is not this body.
    local = await a.post("/increment", json={"key": "a", "value": 2}, headers=key_header("k"))
    assert local.status == 422
    assert await problem_type(local) == "idempotency-key-reused"
    # The same items as a batch are another request too (the route kind is fingerprinted).
    as_batch = await a.post(
        "/increments", json={"increments": [{"key": "a", "value": 1}]}, headers=key_header("k")
    )
    assert as_batch.status == 422
    # Another replica cannot tell: it accepts, and the flush drops it, counts it, logs it.
    caplog.set_level(logging.WARNING, logger="increment_service.writebehind")
    remote = await b.post("/increment", json={"key": "a", "value": 100}, headers=key_header("k"))
    assert remote.status == 202
    await flush(b)
    assert await counters(pg) == {"a": 1}
    assert await app_metric(b, 'increment_idempotency_conflicts_total{stage="flush"}') == 1
    assert await app_metric(a, 'increment_idempotency_conflicts_total{stage="request"}') == 2
    assert any(getattr(r, "event", None) == "idempotency-conflict" for r in caplog.records)
    # And b now knows: the next attempt is refused at once.
    again = await b.post("/increment", json={"key": "a", "value": 100}, headers=key_header("k"))
    assert again.status == 422


async def test_a_replay_after_a_restart_is_applied_once(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    first = await replica()
    body = {"increments": [{"key": "r", "value": 7}]}
    assert (await first.post("/increments", json=body, headers=key_header("restart"))).status == 202
    await flush(first)
    await first.close()  # the replica stops; its memory of the key goes with it
    restarted = await replica()
    assert (
        await restarted.post("/increments", json=body, headers=key_header("restart"))
    ).status == 202
    await flush(restarted)
    assert await counters(pg) == {"r": 7}


async def test_a_4xx_does_not_use_the_key_up(client: Client, pg: asyncpg.Connection) -> None:
    bad = await client.post("/increment", json={"key": "a", "value": "1"}, headers=key_header("u"))
    assert bad.status == 422
    good = await client.post("/increment", json={"key": "a", "value": 1}, headers=key_header("u"))
    assert good.status == 202
    await flush(client)
    assert await counters(pg) == {"a": 1}


async def test_keys_of_two_users_do_not_collide(
    replica: MakeReplica, pg: asyncpg.Connection
) -> None:
    client = await replica()
    # Two users, each signed in through a session of its own (its own cookie jar).
    cookies = [await signed_in(base_url(client)) for _ in range(2)]
    for headers in cookies:
        response = await client.post(
            "/api/increment",
            json={"key": "shared-counter", "value": 1},
            headers={**headers, **key_header("same-key")},
        )
        assert response.status == 202
    # The open routes have one scope of their own.
    assert (
        await client.post(
            "/increment", json={"key": "shared-counter", "value": 1}, headers=key_header("same-key")
        )
    ).status == 202
    await flush(client)
    assert await counters(pg) == {"shared-counter": 3}
    scopes = await pg.fetch("SELECT scope FROM idempotency_keys WHERE key = 'same-key'")
    assert len({r["scope"] for r in scopes}) == 3


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("plain-token_1.2~3", 202),
        ('"a structured-field string"'.replace(" ", "-"), 202),
        ('"with-\\"escapes\\"-and-\\\\"', 202),
        ("k" * 255, 202),
        ("k" * 256, 400),
        ('"' + "k" * 256 + '"', 400),
        ("", 400),
        ('""', 400),
        ("has space", 400),
        ("caf\u00e9", 400),
        ('"unterminated', 400),
        ('"bad \\escape"', 400),
        ('"trailing"x', 400),
    ],
)
async def test_the_idempotency_key_header(
    client: Client, pg: asyncpg.Connection, value: str, status: int
) -> None:
    response = await client.post(
        "/increment",
        data=b'{"key": "h", "value": 1}',
        headers={**JSON, "Idempotency-Key": value.encode("utf-8").decode("latin-1")},
    )
    assert response.status == status
    await flush(client)
    assert await counters(pg) == ({"h": 1} if status == 202 else {})


async def test_two_idempotency_keys_are_400(client: Client, pg: asyncpg.Connection) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Content-Type", "application/json")])
    headers.add("Idempotency-Key", "one")
    headers.add("Idempotency-Key", "two")
    response = await client.post("/increment", data=b'{"key": "h", "value": 1}', headers=headers)
    assert response.status == 400
    assert await problem_type(response) == "invalid-idempotency-key"


async def test_a_key_is_live_for_the_ttl_after_its_record_then_new(
    pg: asyncpg.Connection, clean: None
) -> None:
    """Postgres's clock decides: a key's record is live for IDEMPOTENCY_TTL_SECONDS after it
    was made (a retry within it is a replay); past it, the same key is a new request, and its
    row is taken over. Each key is one row. (The record's age is set by hand: no sleeping.)"""
    request = Keyed("open", "expiring", b"f" * 16, (("e", 1),))

    def batch(seq: int) -> Batch:
        return Batch("r", seq, [], [], 0.0, requests=(request,))

    assert (await apply_batch(pg, batch(1), 10, idempotency_ttl=3600)).claimed == {0}
    await pg.execute("UPDATE idempotency_keys SET recorded_at = now() - interval '3599 seconds'")
    replay = await apply_batch(pg, batch(2), 10, idempotency_ttl=3600)
    assert replay.claimed == set()
    assert replay.recorded_before == {0: Recorded(request.fingerprint)}
    assert 3599 <= replay.recorded_age[0] < 3600
    await pg.execute("UPDATE idempotency_keys SET recorded_at = now() - interval '3600 seconds'")
    assert (await apply_batch(pg, batch(3), 10, idempotency_ttl=3600)).claimed == {0}
    assert await counters(pg) == {"e": 2}
    assert await pg.fetchval("SELECT count(*) FROM idempotency_keys") == 1


async def test_a_record_in_the_previous_buckets_partition_is_live(
    pg: asyncpg.Connection, clean: None
) -> None:
    """A record made in the bucket before (within the TTL) lies in that bucket's partition,
    and a statement of the current bucket finds it there: a replay, written nowhere else."""
    request = Keyed("open", "boundary", b"f" * 16, (("b", 1),))

    def batch(seq: int) -> Batch:
        return Batch("r", seq, [], [], 0.0, requests=(request,))

    assert (await apply_batch(pg, batch(1), 10, idempotency_ttl=3600)).claimed == {0}
    # Moved into the previous bucket's partition, recorded a minute ago.
    await pg.execute(
        "UPDATE idempotency_keys SET bucket = bucket - 1, slot = ((bucket - 1) % 4)::smallint,"
        " recorded_at = now() - interval '60 seconds'"
    )
    second = await apply_batch(pg, batch(2), 10, idempotency_ttl=3600)
    assert second.claimed == set()
    assert second.recorded_before == {0: Recorded(request.fingerprint)}
    assert await counters(pg) == {"b": 1}
    assert await pg.fetchval("SELECT count(*) FROM idempotency_keys") == 1


async def test_a_key_claimed_meanwhile_by_another_statement_is_classified_by_its_body(
    pg: asyncpg.Connection, database_url: str, clean: None
) -> None:
    """Another replica's statement holds the key, uncommitted: this one waits on the unique
    index, and when that commits, finds the key taken, with a record its own snapshot cannot
    see. A query of its own then reads which body the key was used for."""
    other = await asyncpg.connect(database_url)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "INSERT INTO idempotency_keys"
            " SELECT b % 4, 'open', 'race', b, $1, now()"
            " FROM (SELECT floor(extract(epoch FROM now()) / 3600)::bigint AS b) AS t",
            b"x" * 16,
        )
        mine = Keyed("open", "race", b"y" * 16, (("r", 1),))
        applying = asyncio.ensure_future(
            apply_batch(pg, Batch("r", 1, [], [], 0.0, requests=(mine,)), 10)
        )
        await asyncio.sleep(0.3)
        assert not applying.done(), "it waits for the other statement"
        await transaction.commit()
        applied = await applying
    finally:
        await other.close()
    assert applied.claimed == set()
    assert applied.recorded_before == {0: Recorded(b"x" * 16)}, (
        "another body: a conflict, not a replay"
    )
    assert await counters(pg) == {}
