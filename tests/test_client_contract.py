"""The client's answers (issue 19, rule 8), against a scripted server on real sockets.

What is retried, with the same Idempotency-Key and the same body on every attempt: 408, 409,
425, 429, 500, 502, 503, 504, a reset and a timeout; ``Retry-After`` is honoured in both forms
(delay-seconds and HTTP-date) but never past the deadline. What ends an operation: a ``422
idempotency-key-reused`` (``IdempotencyKeyReused``, not an ``IncrementRejected``), any other
4xx (``IncrementRejected``: nothing applied), any other 5xx (``IncrementFailed``: outcome
unknown). A deadline must be finite and above zero.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC, datetime, timedelta

import pytest

from increment_service.client import (
    RETRIED_STATUSES,
    IdempotencyKeyReused,
    IncrementClient,
    IncrementError,
    IncrementFailed,
    IncrementRejected,
    _retry_after,
)
from increment_service.errors import problem_type
from tests.support.fakeclock import FakeClock
from tests.support.scripted import Serve, answer, quick, reset, slow


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(
        datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True
    )


# --- what is retried ---------------------------------------------------------------------


def test_the_retried_statuses() -> None:
    assert frozenset({408, 409, 425, 429, 500, 502, 503, 504}) == RETRIED_STATUSES


@pytest.mark.parametrize("code", sorted(RETRIED_STATUSES))
async def test_each_retried_status_is_retried_with_the_same_key_and_body(
    serve: Serve, code: int
) -> None:
    url, scripted = await serve(
        [answer(code), answer(code), answer(204, {"Preference-Applied": "durable"})]
    )
    async with quick(url) as client:
        result = await client.increments([("a", 1), ("b", -2)], durable=True)
    assert (result.status, result.attempts, result.durable) == (204, 3, True)
    assert len(scripted.seen) == 3
    assert scripted.keys() == {result.idempotency_key}
    for seen in scripted.seen:
        assert seen["path"] == "/increments"
        assert seen["prefer"] == "durable"
        assert seen["content_type"] == "application/json"
        assert seen["body"] == {"increments": [{"key": "a", "value": 1}, {"key": "b", "value": -2}]}


async def test_resets_and_timeouts_are_retried_with_the_same_key(serve: Serve) -> None:
    url, scripted = await serve([reset(), slow(2), reset(), answer(500)])
    async with quick(url) as client:
        result = await client.increment("apples", 5, idempotency_key="given")
    assert (result.status, result.attempts) == (202, 5)
    assert scripted.keys() == {"given"}
    assert all(seen["body"] == {"key": "apples", "value": 5} for seen in scripted.seen)
    assert all(seen["prefer"] is None for seen in scripted.seen)


# --- Retry-After ---------------------------------------------------------------------------


async def test_retry_after_in_seconds_is_honoured(serve: Serve) -> None:
    url, scripted = await serve([answer(429, {"Retry-After": "1"})])
    async with quick(url) as client:
        result = await client.increment("a", 1)
    assert result.attempts == 2
    [gap] = scripted.gaps()
    assert gap >= 1.0


async def test_retry_after_is_the_wait_when_longer_than_the_backoff(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, _ = await serve([answer(429, {"Retry-After": "3"}), answer(503, {"Retry-After": "0"})])
    async with quick(url, deadline=10.0) as client:
        assert (await client.increment("a", 1)).attempts == 3
    assert clock.slept[0] == 3.0
    assert 0 <= clock.slept[1] <= 0.02, "Retry-After 0: the backoff's own jitter"


async def test_retry_after_as_an_http_date_is_honoured(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    # Two seconds ahead, in whole seconds: between one and two seconds from now.
    url, _ = await serve([answer(503, {"Retry-After": http_date(2)})])
    async with quick(url) as client:
        result = await client.increment("a", 1)
    assert result.attempts == 2
    [wait] = clock.slept
    assert 0.9 <= wait <= 2.0


async def test_a_retry_after_date_in_the_past_means_now(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, _ = await serve([answer(503, {"Retry-After": http_date(-3600)})])
    async with quick(url) as client:
        assert (await client.increment("a", 1)).attempts == 2
    [wait] = clock.slept
    assert 0 <= wait <= 0.01, "the first backoff's jitter only"


@pytest.mark.parametrize("value", ["soon", "1.5", "-1", "", "0x10", "\u0661"])
async def test_a_retry_after_in_neither_form_is_ignored(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, _ = await serve([answer(503, {"Retry-After": value})])
    async with quick(url) as client:
        assert (await client.increment("a", 1)).attempts == 2
    [wait] = clock.slept
    assert 0 <= wait <= 0.01, "the first backoff's jitter only"


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_a_retry_after_past_the_deadline_stops_at_once(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    clock = FakeClock().install(monkeypatch)
    retry_after = "30" if form == "seconds" else http_date(30)
    url, scripted = await serve([answer(503, {"Retry-After": retry_after})])
    async with quick(url, deadline=5.0) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert clock.slept == [], "it did not wait for a retry it could not make"
    assert len(scripted.seen) == failed.value.attempts == 1
    assert failed.value.status == 503
    assert "Retry-After" in str(failed.value)
    assert "outcome is unknown" in str(failed.value)
    assert scripted.keys() == {failed.value.idempotency_key}


async def test_the_client_never_sleeps_past_its_deadline(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    # Attempt 1 at 0 s, then 1 s as asked, attempt 2 at 1 s asks 1 s more: past 1.5 s.
    url, scripted = await serve([answer(503, {"Retry-After": "1"})] * 10)
    async with quick(url, deadline=1.5) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert clock.slept == [1.0]
    assert failed.value.attempts == len(scripted.seen) == 2
    assert failed.value.status == 503
    assert "Retry-After 1 s ends past the deadline" in str(failed.value)


async def test_a_wait_that_ends_exactly_at_the_deadline_is_not_taken(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch)
    url, scripted = await serve([answer(503, {"Retry-After": "2"})])
    async with quick(url, deadline=2.0) as client:
        with pytest.raises(IncrementFailed):
            await client.increment("a", 1)
    assert clock.slept == []
    assert len(scripted.seen) == 1


async def test_an_attempt_in_flight_ends_with_the_deadline(serve: Serve) -> None:
    url, _ = await serve([slow(5)])
    started = time.monotonic()
    async with quick(url, deadline=0.6, attempt_timeout=10.0) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    # The contract's bound (the deadline, 0.6 s) with 1 s of margin for a busy machine: an
    # attempt that ignored it would take the 5 s the server waits.
    assert time.monotonic() - started < 0.6 + 1.0
    assert failed.value.status is None  # no answer at all
    assert failed.value.attempts == 1


def test_retry_after_forms() -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC).timestamp()
    assert _retry_after(None, now) is None
    assert _retry_after("0", now) == 0.0
    assert _retry_after(" 120 ", now) == 120.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 60.0  # IMF-fixdate
    assert _retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now) == 60.0  # RFC 850
    assert _retry_after("Wed Oct 21 07:28:00 2015", now) == 60.0  # asctime
    assert _retry_after("Wed, 21 Oct 2015 07:26:00 GMT", now) == 0.0  # past: now
    for bad in ("", "soon", "1.5", "-1", "+1", "1e3", "inf", "nan", "\u0661\u0662"):
        assert _retry_after(bad, now) is None, bad


# --- what ends an operation --------------------------------------------------------------


async def test_a_reused_key_raises_idempotency_key_reused(serve: Serve) -> None:
    url, scripted = await serve([answer(422, slug="idempotency-key-reused")])
    async with quick(url) as client:
        with pytest.raises(IdempotencyKeyReused) as reused:
            await client.increment("a", 1, idempotency_key="taken")
    error = reused.value
    assert not isinstance(error, IncrementRejected)
    assert isinstance(error, IncrementError)
    assert "belongs to another request" in str(error)
    assert "'taken'" in str(error)
    assert (error.status, error.idempotency_key, error.attempts) == (422, "taken", 1)
    assert error.problem["type"] == problem_type("idempotency-key-reused")
    assert len(scripted.seen) == 1


@pytest.mark.parametrize(
    ("code", "slug"),
    [
        (400, "malformed-json"),
        (400, "invalid-idempotency-key"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not-found"),
        (405, "x"),
        (410, "x"),
        (411, "x"),
        (413, "payload-too-large"),
        (415, "unsupported-media-type"),
        (421, "x"),
        (422, "validation"),
        (422, "idempotency-key-reused-not"),
        (400, "idempotency-key-reused"),  # the type counts on a 422 only
        (428, "x"),
        (431, "x"),
        (451, "x"),
        (499, "x"),
    ],
)
async def test_any_other_4xx_is_rejected_nothing_applied(
    serve: Serve, code: int, slug: str
) -> None:
    url, scripted = await serve([answer(code, slug=slug)])
    async with quick(url) as client:
        with pytest.raises(IncrementRejected) as rejected:
            await client.increment("a", 1)
    assert not isinstance(rejected.value, IdempotencyKeyReused)
    assert rejected.value.status == code
    assert rejected.value.problem["detail"] == "said so"
    assert rejected.value.attempts == len(scripted.seen) == 1


@pytest.mark.parametrize("code", [501, 505, 506, 507, 508, 510, 511, 599])
async def test_any_other_5xx_fails_outcome_unknown(serve: Serve, code: int) -> None:
    url, scripted = await serve([answer(code)])
    async with quick(url) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
        assert IncrementRejected not in type(failed.value).__mro__
        assert failed.value.status == code
        assert failed.value.attempts == len(scripted.seen) == 1
        assert "outcome is unknown" in str(failed.value)
        # The same key is safe to send again, and the client lets the caller do it.
        again = await client.increment("a", 1, idempotency_key=failed.value.idempotency_key)
    assert again.status == 202
    assert len(scripted.keys()) == 1


async def test_the_deadline_runs_out_outcome_unknown(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clock moves only while the client waits: the deadline runs out in a wait, never in
    # an attempt, so the last failure is surely the 502 (on a real clock a slow attempt could
    # be cut by the deadline and end as a timeout instead).
    clock = FakeClock().install(monkeypatch)
    url, scripted = await serve([answer(502)] * 1000)
    async with quick(url, deadline=0.5) as client:
        with pytest.raises(IncrementFailed) as failed:
            await client.increment("a", 1)
    assert sum(clock.slept) <= 0.5, "never a wait past the deadline"
    assert len(clock.slept) == failed.value.attempts - 1
    assert failed.value.status == 502
    assert "(last: 502)" in str(failed.value)
    assert failed.value.attempts == len(scripted.seen) > 1
    assert scripted.keys() == {failed.value.idempotency_key}


# --- the deadline --------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [0, 0.0, -0.0, -1, -0.001, math.nan, math.inf, -math.inf])
def test_a_deadline_must_be_finite_and_above_zero(deadline: float) -> None:
    with pytest.raises(ValueError, match="deadline"):
        IncrementClient("http://127.0.0.1:9", deadline=deadline)


@pytest.mark.parametrize("deadline", [0.001, 1, 30.0, 1e9])
def test_a_finite_positive_deadline_is_taken(deadline: float) -> None:
    assert IncrementClient("http://127.0.0.1:9", deadline=deadline).deadline == deadline
