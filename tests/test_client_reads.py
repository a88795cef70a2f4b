"""The client's reads (get, get_many, counters) against a scripted server (real sockets, real
aiohttp; tests/support/scripted.py): what each sends, what it makes of the answers, how it
retries and when it gives up (on a clock of the test's own). Against the real service:
tests/test_reads.py."""

from __future__ import annotations

import random
import types
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from increment_service import client as client_module
from increment_service.client import Counter, IncrementClient, ReadFailed
from increment_service.client_reads import LOOKUP_KEYS
from tests.support.fakeclock import FakeClock
from tests.support.scripted import Serve, Step, answer, quick, reset

STAMP = "2026-12-05T21:00:00.123456+00:00"
WHEN = datetime(2026, 12, 5, 21, 0, 0, 123456, tzinfo=UTC)


def ok(body: Any) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        return web.json_response(body)

    return step


def item(key: str, value: int = 1) -> dict[str, Any]:
    return {"key": key, "value": value, "updatedAt": STAMP}


def found_of(request_keys: list[str], missing: set[str]) -> Step:
    """A lookup's answer: every key asked found (value: its length) unless in ``missing``."""

    async def step(request: web.Request) -> web.StreamResponse:
        keys = (await request.json())["keys"]
        assert keys == request_keys
        return web.json_response(
            {
                "counters": [item(k, len(k)) for k in keys if k not in missing],
                "missing": [k for k in keys if k in missing],
            }
        )

    return step


async def test_get_asks_the_lookup_route_and_answers_the_counter(serve: Serve) -> None:
    url, scripted = await serve([ok({"counters": [item("a/b %", 7)], "missing": []})])
    async with quick(url, prefix="/api") as client:
        counter = await client.get("a/b %")
    assert counter == Counter("a/b %", 7, WHEN)
    (seen,) = scripted.seen
    assert (seen["method"], seen["path"]) == ("POST", "/api/counters/lookup")
    assert seen["body"] == {"keys": ["a/b %"]}
    assert seen["content_type"] == "application/json"
    assert seen["query"] == []


async def test_get_of_a_missing_counter_is_none(serve: Serve) -> None:
    url, _ = await serve([ok({"counters": [], "missing": ["a"]})])
    async with quick(url) as client:
        assert await client.get("a") is None


async def test_get_many_sends_each_key_once_unescaped(serve: Serve) -> None:
    keys = ["b", "\u00e9\U0001f600", "b", "c"]
    url, scripted = await serve([found_of(["b", "\u00e9\U0001f600", "c"], {"c"})])
    async with quick(url) as client:
        found, missing = await client.get_many(keys)
    assert found == {
        "b": Counter("b", 1, WHEN),
        "\u00e9\U0001f600": Counter("\u00e9\U0001f600", 2, WHEN),
    }
    assert missing == ["c"]
    (seen,) = scripted.seen
    # UTF-8 as it is, not \u escapes: 1000 long keys fit the lookup's 1 MiB only so.
    assert "\u00e9\U0001f600".encode() in seen["raw"]
    assert b"\\u" not in seen["raw"]


async def test_get_many_of_more_keys_than_a_lookup_takes_sends_several(serve: Serve) -> None:
    keys = [f"k{n}" for n in range(2 * LOOKUP_KEYS + 1)]
    url, scripted = await serve(
        [
            found_of(keys[:LOOKUP_KEYS], {"k1"}),
            found_of(keys[LOOKUP_KEYS : 2 * LOOKUP_KEYS], set()),
            found_of(keys[2 * LOOKUP_KEYS :], {keys[-1]}),
        ]
    )
    async with quick(url) as client:
        found, missing = await client.get_many(iter(keys))
    assert LOOKUP_KEYS == 1000
    assert len(scripted.seen) == 3
    assert missing == ["k1", keys[-1]]
    assert list(found) == [k for k in keys if k not in ("k1", keys[-1])]
    assert found["k1000"] == Counter("k1000", 5, WHEN)


async def test_get_many_of_no_keys_asks_nothing(serve: Serve) -> None:
    url, scripted = await serve([])
    async with quick(url) as client:
        assert await client.get_many([]) == ({}, [])
    assert scripted.seen == []


async def test_counters_follows_next_to_its_null(serve: Serve) -> None:
    url, scripted = await serve(
        [
            ok({"counters": [item("p+1"), item("p+2", 2)], "next": "p+2"}),
            ok({"counters": [item("p+3", 3)], "next": None}),
        ]
    )
    async with quick(url, prefix="/api") as client:
        got = [counter async for counter in client.counters("p+", page_size=2)]
    assert got == [Counter("p+1", 1, WHEN), Counter("p+2", 2, WHEN), Counter("p+3", 3, WHEN)]
    first, second = scripted.seen
    assert (first["method"], first["path"], first["raw"]) == ("GET", "/api/counters", b"")
    assert first["query"] == [("prefix", "p+"), ("limit", "2")]
    assert second["query"] == [("prefix", "p+"), ("limit", "2"), ("after", "p+2")]


async def test_counters_by_default_lists_every_counter_a_hundred_at_a_time(serve: Serve) -> None:
    url, scripted = await serve([ok({"counters": [], "next": None})])
    async with quick(url) as client:
        assert [counter async for counter in client.counters()] == []
    assert scripted.seen[0]["query"] == [("prefix", ""), ("limit", "100")]
    assert scripted.seen[0]["content_type"] == "application/octet-stream", "no body"


async def test_a_read_is_retried_until_its_200(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, scripted = await serve(
        [
            answer(502),
            answer(503, {"Retry-After": "3"}),
            reset(),
            answer(429),
            ok({"counters": [], "missing": ["a"]}),
        ]
    )
    async with quick(url, deadline=10.0) as client:
        assert await client.get("a") is None
    assert len(scripted.seen) == 5
    assert clock.slept[1] == 3.0, "Retry-After honoured"
    assert all(0 <= wait <= 0.05 for n, wait in enumerate(clock.slept) if n != 1)
    assert len(clock.slept) == 4


@pytest.mark.parametrize(
    ("status", "problem", "message"),
    [
        (401, {"detail": "log in"}, "401: log in"),
        (422, {"detail": "bad"}, "422: bad"),
        (404, {}, "404: no detail"),
        (501, {"detail": "no"}, "501: no"),
        (201, {"detail": "created?"}, "201: created?"),
    ],
)
async def test_an_answer_not_retried_fails_the_read_at_once(
    serve: Serve, status: int, problem: dict[str, Any], message: str
) -> None:
    async def step(request: web.Request) -> web.StreamResponse:
        return web.json_response(problem, status=status)

    url, scripted = await serve([step])
    async with quick(url) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    assert str(failed.value) == message
    assert (failed.value.status, failed.value.attempts) == (status, 1)
    assert failed.value.problem == problem
    assert len(scripted.seen) == 1


async def test_the_deadline_ends_a_read_and_says_the_last_answer(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, scripted = await serve([answer(503)] * 100)
    async with IncrementClient(
        url, deadline=1.0, first_backoff=0.1, max_backoff=0.4, rng=MaxRandom()
    ) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    # 0.1 + 0.2 + 0.4 waited; another 0.4 would end at the deadline.
    assert clock.slept == [0.1, 0.2, 0.4]
    assert str(failed.value) == "no answer within 1 s (last: 503)"
    assert (failed.value.status, failed.value.attempts) == (503, 4)
    assert failed.value.problem == {}
    assert len(scripted.seen) == 4


async def test_a_retry_after_past_the_deadline_ends_the_read(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, _ = await serve([answer(503, {"Retry-After": "2"})])
    async with quick(url, deadline=2.0) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    assert clock.slept == []
    assert (failed.value.status, failed.value.attempts) == (503, 1)


class TickingClock(FakeClock):
    """Every look at the clock moves it by ``tick``."""

    def __init__(self, tick: float) -> None:
        super().__init__()
        self.tick = tick

    def monotonic(self) -> float:
        now = self.now
        self.now += self.tick
        return now


@pytest.mark.parametrize("tick", [0.5, 0.7])
async def test_a_deadline_gone_before_the_first_attempt_asks_nothing(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, tick: float
) -> None:
    clock = TickingClock(tick)
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    url, scripted = await serve([])
    async with IncrementClient(url, deadline=0.5) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    assert scripted.seen == []
    assert str(failed.value) == "no answer within 0.5 s (last: )"
    assert (failed.value.attempts, failed.value.status) == (0, None)


async def test_a_read_between_a_wait_and_the_deadline_says_the_last_answer(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each look at the clock takes 0.2 s: the wait fits before the deadline, the attempt
    # after it does not.
    clock = TickingClock(0.2).install(monkeypatch)
    url, _ = await serve([answer(503)])
    async with IncrementClient(url, deadline=0.5, first_backoff=0.01) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    assert len(clock.slept) == 1
    assert (failed.value.status, failed.value.attempts) == (503, 1)
    assert str(failed.value) == "no answer within 0.5 s (last: 503)"


async def test_a_connection_failure_is_named_by_its_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock().install(monkeypatch)
    from tests.support.net import free_port

    async with IncrementClient(
        f"http://127.0.0.1:{free_port()}", deadline=0.2, first_backoff=0.1, rng=MaxRandom()
    ) as client:
        with pytest.raises(ReadFailed) as failed:
            await client.get("a")
    assert str(failed.value) == "no answer within 0.2 s (last: ClientConnectorError)"
    assert failed.value.status is None
    assert clock.slept == [0.1]


async def test_an_attempt_is_cut_at_its_timeout(serve: Serve) -> None:
    from tests.support.scripted import slow

    url, scripted = await serve([slow(2), ok({"counters": [], "missing": ["a"]})])
    async with quick(url, attempt_timeout=0.3) as client:
        assert await client.get("a") is None
    assert len(scripted.seen) == 2


async def test_reads_ignore_the_increment_prefix(serve: Serve) -> None:
    url, scripted = await serve([ok({"counters": [], "missing": ["a"]})])
    async with IncrementClient(url + "//", prefix="/api", rng=random.Random(1)) as client:
        await client.get("a")
    assert scripted.seen[0]["path"] == "/api/counters/lookup"


class MaxRandom(random.Random):
    """Full jitter at its ceiling, so the waits are known."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("base", "reads"),
    [("http://h//", "http://h/api/counters"), ("http://X/", "http://X/api/counters")],
)
def test_the_reads_url(base: str, reads: str) -> None:
    assert IncrementClient(base, prefix="/api")._reads_url == reads
