"""The shipped client: one Idempotency-Key per operation, the same key on every retry.

A scripted HTTP server (real sockets, real aiohttp) answers each attempt as a test says: a 502,
a 503 with Retry-After, a reset, an answer too slow for the attempt timeout, then success; the
server records the key every attempt carried. The real service behind nginx is driven by the
checker in test_exactly_once.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp import web

from increment_service.client import IncrementFailed, IncrementRejected
from tests.support.fakeclock import FakeClock
from tests.support.scripted import Serve, Step, answer, quick, reset, slow


def json_status(code: int, body: dict[str, Any]) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=code)

    return step


async def test_every_retryable_failure_is_retried_with_the_same_key(serve: Serve) -> None:
    url, scripted = await serve(
        [answer(502), answer(503, {"Retry-After": "0"}), answer(504), answer(409), reset(), slow(2)]
    )
    async with quick(url) as client:
        result = await client.increment("apples", 5)
    assert result.status == 202
    assert result.attempts == 7
    keys = {seen["key"] for seen in scripted.seen}
    assert len(keys) == 1
    assert result.idempotency_key in keys
    assert all(seen["body"] == {"key": "apples", "value": 5} for seen in scripted.seen)


async def test_each_operation_has_a_key_of_its_own(serve: Serve) -> None:
    url, scripted = await serve([])
    async with quick(url) as client:
        first = await client.increment("a", 1)
        second = await client.increment("a", 1)
        chosen = await client.increment("a", 1, idempotency_key="mine")
    assert len({first.idempotency_key, second.idempotency_key, "mine"}) == 3
    assert [seen["key"] for seen in scripted.seen] == [
        first.idempotency_key,
        second.idempotency_key,
        "mine",
    ]
    assert chosen.idempotency_key == "mine"


async def test_a_definite_no_is_not_retried(serve: Serve) -> None:
    problem = {"type": "urn:x:validation", "title": "t", "status": 422, "detail": "bad value"}
    url, scripted = await serve([json_status(422, problem)])
    async with quick(url) as client:
        with pytest.raises(IncrementRejected) as rejected:
            await client.increment("a", 1)
    assert rejected.value.status == 422
    assert rejected.value.problem["detail"] == "bad value"
    assert len(scripted.seen) == 1


async def test_the_deadline_ends_the_retries_and_says_the_key(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Judged by the waits the client asks for (a clock of the test's own), not by wall time.
    clock = FakeClock().install(monkeypatch)
    url, scripted = await serve([answer(503)] * 1000)
    async with quick(url, deadline=0.5) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert 0 < sum(clock.slept) <= 0.5
    assert len(scripted.seen) < 1000, "the deadline, not the script, ended it"
    assert failed.value.attempts == len(scripted.seen) > 1
    assert {seen["key"] for seen in scripted.seen} == {failed.value.idempotency_key}


async def test_retry_after_is_honoured(serve: Serve) -> None:
    url, scripted = await serve([answer(503, {"Retry-After": "1"})])
    started = time.monotonic()
    async with quick(url) as client:
        await client.increment("a", 1)
    assert time.monotonic() - started >= 1.0
    assert len(scripted.seen) == 2


async def test_batches_durable_and_session_routes(serve: Serve) -> None:
    not_applied = {"notApplied": [{"index": 1, "key": "b", "reason": "bigint"}]}

    async def partly(request: web.Request) -> web.StreamResponse:
        return web.json_response(not_applied, headers={"Preference-Applied": "durable"})

    url, scripted = await serve([answer(204, {"Preference-Applied": "durable"}), partly])
    async with quick(url) as client:
        whole = await client.increments([("a", 1), ("b", 2)], durable=True)
        part = await client.increments([("a", 1), ("b", 2)], durable=True)
    assert (whole.status, whole.durable, whole.not_applied) == (204, True, ())
    assert (part.status, part.durable, part.not_applied) == (200, True, (1,))
    first = scripted.seen[0]
    assert (first["path"], first["prefer"]) == ("/increments", "durable")
    assert first["body"] == {"increments": [{"key": "a", "value": 1}, {"key": "b", "value": 2}]}
    async with quick(url, prefix="/api") as client:
        await client.increment("a", 1)
    assert scripted.seen[-1]["path"] == "/api/increment"


def representation(body: dict[str, Any], applied: str = "durable, return=representation") -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, headers={"Preference-Applied": applied})

    return step


async def test_return_value_asks_for_the_totals_and_reads_them(serve: Serve) -> None:
    one = {"counters": [{"key": "a", "value": 41, "updatedAt": "x"}], "notApplied": []}
    two = {
        "counters": [
            {"key": "a", "value": 42, "updatedAt": "x"},
            {"key": "b", "value": -3, "updatedAt": "x"},
            {"value": 1},  # no key: not a counter (a server of another version, say)
            "junk",
        ],
        "notApplied": [{"index": 2, "key": "c", "reason": "bigint"}],
    }
    url, scripted = await serve(
        [
            representation(one),
            representation(two),
            representation(one, applied="durable"),  # the totals were not applied
            representation({"counters": [], "notApplied": [{"index": 0, "key": "a"}]}),
            representation({"notApplied": []}),  # no counters at all: none
        ]
    )
    async with quick(url) as client:
        single = await client.increment("a", 1, return_value=True)
        batch = await client.increments([("a", 1), ("b", 2), ("c", 3)], return_value=True)
        not_told = await client.increment("a", 1, return_value=True)
        refused = await client.increment("a", 1, return_value=True)
        bare = await client.increment("a", 1, return_value=True)
        plain = await client.increment("a", 1, durable=True)
    assert [seen["prefer"] for seen in scripted.seen] == [
        "durable, return=representation",
        "durable, return=representation",
        "durable, return=representation",
        "durable, return=representation",
        "durable, return=representation",
        "durable",
    ]
    assert (single.status, single.durable, single.counters, single.value) == (
        200,
        True,
        {"a": 41},
        41,
    )
    assert (batch.counters, batch.value, batch.not_applied) == ({"a": 42, "b": -3}, None, (2,))
    assert (not_told.durable, not_told.counters, not_told.value) == (True, None, None)
    assert (refused.counters, refused.value, refused.not_applied) == ({}, None, (0,))
    assert (bare.counters, bare.value) == ({}, None)
    assert (plain.status, plain.counters, plain.value) == (202, None, None)


async def test_preference_applied_is_a_list(serve: Serve) -> None:
    url, _ = await serve(
        [
            answer(204, {"Preference-Applied": " Durable "}),
            answer(204, {"Preference-Applied": "respond-async, durable"}),
            answer(204, {"Preference-Applied": "durables"}),
        ]
    )
    async with quick(url) as client:
        told = [(await client.increment("a", 1, durable=True)).durable for _ in range(3)]
    assert told == [True, True, False]


async def test_a_token_goes_as_a_bearer_to_the_api_routes_on_every_attempt(serve: Serve) -> None:
    url, scripted = await serve([answer(503, {"Retry-After": "0"})])
    async with quick(url, token="isvc_secret") as client:
        retried = await client.increment("a", 1)
        await client.increments([("a", 1)])
    assert [seen["path"] for seen in scripted.seen] == [
        "/api/increment",
        "/api/increment",
        "/api/increments",
    ]
    assert [seen["authorization"] for seen in scripted.seen] == ["Bearer isvc_secret"] * 3
    assert retried.attempts == 2
    assert scripted.seen[0]["key"] == scripted.seen[1]["key"] == retried.idempotency_key
    async with quick(url, token="isvc_secret", prefix="") as client:
        await client.increment("a", 1)
    assert (scripted.seen[-1]["path"], scripted.seen[-1]["authorization"]) == (
        "/increment",
        "Bearer isvc_secret",
    )
    async with quick(url) as client:
        await client.increment("a", 1)
    assert (scripted.seen[-1]["path"], scripted.seen[-1]["authorization"]) == ("/increment", None)


async def test_a_refused_token_is_a_definite_no(serve: Serve) -> None:
    url, scripted = await serve([answer(401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})])
    async with quick(url, token="isvc_revoked") as client:
        with pytest.raises(IncrementRejected) as refused:
            await client.increment("a", 1)
    assert (refused.value.status, refused.value.attempts) == (401, 1)
    assert len(scripted.seen) == 1
