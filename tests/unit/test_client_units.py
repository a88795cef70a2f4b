"""client.py in pieces: its exceptions and their messages, the answer-to-exception mapping,
Retry-After, the backoff, its defaults, the session it is given or makes, and what it sends for
every argument (against a scripted server on a real socket, with a clock of the test's own).
The scripted-server contract as a whole is tests/test_client_contract.py."""

from __future__ import annotations

import os
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from increment_service import client as client_module
from increment_service.client import (
    IDEMPOTENCY_KEY_REUSED,
    IdempotencyKeyReused,
    IncrementClient,
    IncrementFailed,
    IncrementRejected,
    _final,
    _problem,
    _retry_after,
)
from tests.support.fakeclock import FakeClock

UNKNOWN = "; the outcome is unknown, and a retry with the same idempotency_key is safe"

Step = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(code: int, body: Any = None, headers: dict[str, str] | None = None) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        if body is None:
            return web.Response(status=code, headers=headers)
        return web.json_response(body, status=code, headers=headers)

    return step


class Server:
    def __init__(self) -> None:
        self.script: list[Step] = []
        self.seen: list[tuple[str, dict[str, str], Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.headers), await request.json()))
        step = self.script.pop(0) if self.script else answer(202)
        return await step(request)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Server]]:
    scripted = Server()
    app = web.Application()
    app.router.add_post("/{tail:.*}", scripted.handle)
    test_server = TestServer(app)
    await test_server.start_server()
    yield str(test_server.make_url("")).rstrip("/"), scripted
    await test_server.close()


class MaxRandom(random.Random):
    """Full jitter at its ceiling: the backoff's bound itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --- the exceptions ------------------------------------------------------------------------


def test_a_rejection_says_its_status_and_detail() -> None:
    problem = {"detail": "bad value", "type": "urn:x"}
    rejected = IncrementRejected(422, problem, "k", 2)
    assert str(rejected) == "422: bad value"
    assert (rejected.status, rejected.problem, rejected.idempotency_key, rejected.attempts) == (
        422,
        problem,
        "k",
        2,
    )
    assert rejected.problem is not problem, "a copy"
    assert str(IncrementRejected(400, {}, "k", 1)) == "400: "


def test_a_reused_key_says_so_in_full() -> None:
    reused = IdempotencyKeyReused(422, {"type": IDEMPOTENCY_KEY_REUSED}, "mine", 1)
    assert str(reused) == (
        "422: the Idempotency-Key 'mine' belongs to another request (another body was sent"
        " under it), and this request is not applied under it; two requests share the key:"
        " find out why before sending this one under a new key"
    )
    assert (reused.status, reused.idempotency_key, reused.attempts) == (422, "mine", 1)
    assert reused.problem == {"type": IDEMPOTENCY_KEY_REUSED}


def test_a_failure_has_no_status_or_problem_unless_given() -> None:
    failed = IncrementFailed("m", "k", 3)
    assert (str(failed), failed.idempotency_key, failed.attempts) == ("m", "k", 3)
    assert (failed.status, failed.problem) == (None, {})


@pytest.mark.parametrize(
    ("status", "problem", "kind"),
    [
        (422, {"type": IDEMPOTENCY_KEY_REUSED}, IdempotencyKeyReused),
        (422, {"type": "urn:other"}, IncrementRejected),
        (409, {"type": IDEMPOTENCY_KEY_REUSED}, IncrementRejected),
        (400, {}, IncrementRejected),
        (499, {}, IncrementRejected),
        (500, {}, IncrementFailed),
        (501, {}, IncrementFailed),
        (300, {}, IncrementFailed),
        (399, {}, IncrementFailed),
    ],
)
def test_each_final_answer_has_its_exception(
    status: int, problem: dict[str, Any], kind: type[Exception]
) -> None:
    error = _final(status, problem, "key", 4)
    assert type(error) is kind
    assert (error.idempotency_key, error.attempts) == ("key", 4)
    assert error.status == status  # type: ignore[attr-defined]
    assert error.problem == problem  # type: ignore[attr-defined]


def test_an_unknown_outcome_says_its_detail_or_that_there_is_none() -> None:
    failed = _final(501, {"detail": "not here"}, "k", 1)
    assert str(failed) == "501: not here" + UNKNOWN
    assert failed.problem == {"detail": "not here"}  # type: ignore[attr-defined]
    assert str(_final(505, {}, "k", 1)) == "505: no detail" + UNKNOWN
    assert str(_final(505, {"detail": ""}, "k", 1)) == "505: no detail" + UNKNOWN


@pytest.mark.parametrize(
    ("payload", "problem"),
    [(b"", {}), (b"[1]", {}), (b"17", {}), (b"not json", {}), (b'{"a": 1}', {"a": 1})],
)
def test_a_problem_is_an_object_or_nothing(payload: bytes, problem: dict[str, Any]) -> None:
    assert _problem(payload) == problem


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_every_http_date_form_is_in_gmt(value: str, local_time_not_gmt: None) -> None:
    then = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    assert _retry_after(value, now=then - 10) == 10.0
    assert _retry_after(value, now=then + 10) == 0.0
    assert _retry_after(f"  {value} ", now=then - 1) == 1.0


@pytest.fixture
def local_time_not_gmt() -> Iterator[None]:
    """A machine whose local time is not GMT: a date without a zone is GMT all the same."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.mark.parametrize(
    ("value", "wait"), [(None, None), ("0", 0.0), ("120", 120.0), (" 7 ", 7.0), ("soon", None)]
)
def test_retry_after_in_seconds(value: str | None, wait: float | None) -> None:
    assert _retry_after(value, now=0.0) == wait


# --- the client's settings -----------------------------------------------------------------


def test_the_defaults() -> None:
    client = IncrementClient("http://h/")
    assert client.url == "http://h"
    assert (client.deadline, client.attempt_timeout) == (30.0, 10.0)
    assert (client.first_backoff, client.max_backoff) == (0.05, 2.0)


@pytest.mark.parametrize(
    ("base", "prefix", "url"),
    [
        ("http://h", "", "http://h"),
        ("http://h//", "/api", "http://h/api"),
        ("/relative/", "", "/relative"),
        ("http://X/", "", "http://X"),
    ],
)
def test_the_url(base: str, prefix: str, url: str) -> None:
    assert IncrementClient(base, prefix=prefix).url == url


def test_the_backoff_doubles_up_to_its_ceiling_and_takes_a_longer_retry_after() -> None:
    client = IncrementClient("http://h", first_backoff=0.1, max_backoff=1.0, rng=MaxRandom())
    assert [client._backoff(n, None) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert client._backoff(1, 3.0) == 3.0
    assert client._backoff(5, 0.5) == 1.0
    assert client._backoff(1, 0.0) == 0.1


# --- the session ---------------------------------------------------------------------------


async def test_a_session_given_is_used_and_left_open(server: tuple[str, Server]) -> None:
    url, scripted = server
    async with aiohttp.ClientSession(headers={"X-Mine": "yes"}) as session:
        async with IncrementClient(url, session=session, prefix="/api") as client:
            assert client.session is session
            await client.increment("a", 1)
        assert not session.closed, "the caller's session is the caller's to close"
    path, headers, _ = scripted.seen[0]
    assert (path, headers["X-Mine"]) == ("/api/increment", "yes")


async def test_a_session_of_its_own_is_closed_and_made_again_on_use() -> None:
    client = IncrementClient("http://h")
    first = client.session
    assert client.session is first
    await client.close()
    assert first.closed
    second = client.session
    assert isinstance(second, aiohttp.ClientSession)
    assert second is not first
    assert not second.closed
    await client.close()
    await client.close()  # twice: nothing left to close


# --- what is sent for every argument -------------------------------------------------------


async def test_what_each_argument_sends(server: tuple[str, Server]) -> None:
    url, scripted = server
    async with IncrementClient(url) as client:
        plain = await client.increment("a", 5)
        durable = await client.increment("b", -1, durable=True, idempotency_key="k1")
        batch = await client.increments([("c", 1), ("d", 2)])
        durable_batch = await client.increments([("e", 3)], durable=True, idempotency_key="k2")
    (p1, h1, b1), (p2, h2, b2), (p3, h3, b3), (p4, h4, b4) = scripted.seen
    assert (p1, b1, h1["Idempotency-Key"], "Prefer" in h1) == (
        "/increment",
        {"key": "a", "value": 5},
        plain.idempotency_key,
        False,
    )
    assert len(plain.idempotency_key) == 32
    assert (p2, b2, h2["Idempotency-Key"], h2["Prefer"]) == (
        "/increment",
        {"key": "b", "value": -1},
        "k1",
        "durable",
    )
    assert durable.idempotency_key == "k1"
    assert (p3, b3, "Prefer" in h3) == (
        "/increments",
        {"increments": [{"key": "c", "value": 1}, {"key": "d", "value": 2}]},
        False,
    )
    assert h3["Idempotency-Key"] == batch.idempotency_key
    assert (p4, h4["Idempotency-Key"], h4["Prefer"]) == ("/increments", "k2", "durable")
    assert b4 == {"increments": [{"key": "e", "value": 3}]}
    assert durable_batch.idempotency_key == "k2"


@pytest.mark.parametrize(
    ("code", "body", "headers", "durable", "not_applied"),
    [
        (202, None, None, False, ()),
        (202, {"notApplied": [{"index": 0}]}, None, False, ()),  # only a 200 says it
        (204, None, {"Preference-Applied": "DURABLE"}, True, ()),
        (200, {}, {"Preference-Applied": "durable"}, True, ()),
        (200, {"notApplied": [{"index": 2}, {"x": 1}, {"index": "0"}]}, None, False, (2, 0)),
    ],
)
async def test_what_an_answer_says(
    server: tuple[str, Server],
    code: int,
    body: Any,
    headers: dict[str, str] | None,
    durable: bool,
    not_applied: tuple[int, ...],
) -> None:
    url, scripted = server
    scripted.script = [answer(code, body, headers)]
    async with IncrementClient(url) as client:
        result = await client.increments([("a", 1)], idempotency_key="k")
    assert (result.status, result.durable, result.not_applied) == (code, durable, not_applied)
    assert (result.idempotency_key, result.attempts) == ("k", 1)


async def test_a_300_is_no_success(server: tuple[str, Server]) -> None:
    url, scripted = server
    scripted.script = [answer(300)]
    async with IncrementClient(url) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert failed.value.status == 300


async def test_a_rejection_carries_the_key_and_attempts(server: tuple[str, Server]) -> None:
    url, scripted = server
    scripted.script = [answer(503), answer(422, {"detail": "no"})]
    async with IncrementClient(url, first_backoff=0.001) as client:
        with pytest.raises(IncrementRejected) as rejected:
            await client.increment("a", 1, idempotency_key="mine")
    assert (rejected.value.idempotency_key, rejected.value.attempts) == ("mine", 2)
    assert str(rejected.value) == "422: no"


# --- the deadline, on a clock of the test's own ----------------------------------------------


class TickingClock(FakeClock):
    """Every look at the clock moves it by ``tick``."""

    def __init__(self, tick: float) -> None:
        super().__init__()
        self.tick = tick

    def monotonic(self) -> float:
        now = self.now
        self.now += self.tick
        return now


async def test_a_deadline_that_runs_out_between_a_wait_and_the_next_attempt(
    server: tuple[str, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each look at the clock takes 0.2 s: the wait fits before the deadline, the attempt
    # after it does not; the last answer (the 503) is what the failure says.
    clock = TickingClock(0.2).install(monkeypatch)
    url, scripted = server
    scripted.script = [answer(503)]
    async with IncrementClient(url, deadline=0.5, first_backoff=0.01) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert len(clock.slept) == 1
    assert (failed.value.status, failed.value.attempts) == (503, 1)
    assert "(last: 503)" in str(failed.value)


@pytest.mark.parametrize("tick", [0.5, 0.7])
async def test_a_deadline_gone_before_the_first_attempt(
    server: tuple[str, Server], monkeypatch: pytest.MonkeyPatch, tick: float
) -> None:
    # The clock moves by at least the deadline between the start and the first look: the
    # deadline is over (exactly at it, or past it), and no attempt is made.
    clock = TickingClock(tick)
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    url, scripted = server
    async with IncrementClient(url, deadline=0.5) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1, idempotency_key="k")
    assert scripted.seen == []
    assert str(failed.value) == (
        "no definite answer within 0.5 s (last: ); the outcome is unknown, and a retry with"
        " the same idempotency_key is safe"
    )
    assert (failed.value.idempotency_key, failed.value.attempts, failed.value.status) == (
        "k",
        0,
        None,
    )


async def test_a_retry_after_ending_exactly_at_the_deadline_says_so(
    server: tuple[str, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, scripted = server
    scripted.script = [answer(503, headers={"Retry-After": "2"})]
    async with IncrementClient(url, deadline=2.0) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1, idempotency_key="k")
    assert clock.slept == []
    assert str(failed.value) == (
        "no definite answer within 2 s (last: 503, Retry-After 2 s ends past the deadline);"
        " the outcome is unknown, and a retry with the same idempotency_key is safe"
    )
    assert (failed.value.status, failed.value.attempts) == (503, 1)


async def test_a_connection_failure_is_named_by_its_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock().install(monkeypatch)
    from tests.support.net import free_port

    async with IncrementClient(
        f"http://127.0.0.1:{free_port()}", deadline=0.2, first_backoff=0.1, rng=MaxRandom()
    ) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert "(last: ClientConnectorError)" in str(failed.value)
    assert failed.value.status is None
    assert clock.slept == [0.1], "0.1, then 0.2 more would end past 0.2 s"
