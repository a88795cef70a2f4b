"""A small asyncio client that makes retries safe (aiohttp only).

Every operation gets an ``Idempotency-Key`` of its own, and every retry of it sends the same
key, so an increment whose answer was lost (a 502 or 504 from the load balancer, a reset, a
timeout) can be sent again without ever counting twice::

    async with IncrementClient("http://localhost:3333") as client:
        await client.increment("apples", 5)
        await client.increments([("apples", 1), ("pears", 2)])
        await client.increment("invoices", 1, durable=True)  # answered after the commit
        total = (await client.increment("invoices", 1, return_value=True)).value

What is retried, always with the same key: 408, 409 (this key's first request is still
undecided), 425, 429, 500, 502, 503 and 504, connection errors (a reset) and timeouts; with
backoff (exponential, full jitter) until a total deadline, and never sooner than a
``Retry-After`` asks (delay-seconds or an HTTP-date). A ``Retry-After`` that ends past the
deadline stops the retries at once: the client never sleeps past its deadline.

Reads (``get``, ``get_many``, ``counters``: the persisted values, through the ``/api`` read
routes, so with a ``session`` that is logged in) are retried the same way, having nothing to
apply twice; an answer that is neither a 200 nor retried raises ``ReadFailed``.

Any other answer to an increment is final:

- a 2xx is success (``Result``);
- a ``422`` of problem type ``...:idempotency-key-reused`` raises ``IdempotencyKeyReused``: the
  key belongs to another request (another body was sent under it);
- any other 4xx raises ``IncrementRejected``: nothing was applied;
- any other answer (a 5xx such as 501 or 505) raises ``IncrementFailed``, and so does a deadline
  that runs out: the outcome is unknown, and calling again with the same ``idempotency_key``
  (``IncrementFailed.idempotency_key``) is safe within the server's ``IDEMPOTENCY_TTL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import math
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC
from types import TracebackType
from typing import Any

import aiohttp

# Counter and ReadFailed are the reads' public names, here with the rest.
from .client_reads import Counter as Counter
from .client_reads import CounterReads
from .client_reads import ReadFailed as ReadFailed

#: Answers that say "not now": the request is retried with the same key.
RETRIED_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

#: The problem type of a 422 whose key belongs to another request.
IDEMPOTENCY_KEY_REUSED = "urn:increment-service:problem:idempotency-key-reused"


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """What the service answered, in the end, to one operation."""

    status: int  # 202 (accepted: in memory), 204 (durable: committed), 200 (durable, partly)
    idempotency_key: str
    attempts: int
    durable: bool  # the answer came after the commit that holds the increments
    # With durable=True, the items (indexes into the operation's items) that were not applied
    # because their counter would have left the bigint range.
    not_applied: tuple[int, ...] = ()
    # With return_value=True (read-your-writes): each counter the operation changed, its total
    # right after the operation in its commit; None when the answer carried no totals (a
    # replay of a first answer that had none).
    counters: Mapping[str, int] | None = None

    @property
    def value(self) -> int | None:
        """The total of the one counter an ``increment(..., return_value=True)`` changed (None
        if it was not applied, or the answer carried no totals)."""
        if self.counters is None or len(self.counters) != 1:
            return None
        return next(iter(self.counters.values()))


class IncrementError(Exception):
    def __init__(self, message: str, idempotency_key: str, attempts: int) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.attempts = attempts


class IncrementRejected(IncrementError):
    """A definite no (a 4xx the client does not retry): nothing was applied; retrying the same
    request will not help."""

    def __init__(
        self, status: int, problem: Mapping[str, Any], idempotency_key: str, attempts: int
    ) -> None:
        detail = problem.get("detail", "")
        super().__init__(f"{status}: {detail}", idempotency_key, attempts)
        self.status = status
        self.problem = dict(problem)


class IdempotencyKeyReused(IncrementError):
    """``422 idempotency-key-reused``: the key belongs to another request (another body, or
    the other route kind, was sent under it first). Not an ``IncrementRejected``: the request
    is not wrong, its key is taken, and sending it again under a new key is right only once
    the caller knows why two requests shared one key (a key reused by mistake, a collision);
    otherwise it may count twice."""

    def __init__(
        self, status: int, problem: Mapping[str, Any], idempotency_key: str, attempts: int
    ) -> None:
        super().__init__(
            f"{status}: the Idempotency-Key {idempotency_key!r} belongs to another request"
            " (another body was sent under it), and this request is not applied under it; two"
            " requests share the key: find out why before sending this one under a new key",
            idempotency_key,
            attempts,
        )
        self.status = status
        self.problem = dict(problem)


class IncrementFailed(IncrementError):
    """The outcome is unknown: a 5xx the client does not retry (``status``), or the deadline
    ran out (``status`` is the last attempt's, None if it got no answer). A retry with the
    same key is safe."""

    def __init__(
        self,
        message: str,
        idempotency_key: str,
        attempts: int,
        *,
        status: int | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, idempotency_key, attempts)
        self.status = status
        self.problem = dict(problem or {})


class IncrementClient(CounterReads):
    """Sends increments to one base URL (a load balancer, say), retrying safely.

    ``deadline`` (seconds, finite and above zero) bounds each operation, retries and waits
    included. ``token`` (an API token with the ``increment`` scope) is sent as
    ``Authorization: Bearer`` and makes the default ``prefix`` ``"/api"``: the routes whose
    Idempotency-Keys are the token's user's own. ``prefix="/api"`` without a token uses the
    session routes: give a ``session`` whose cookie jar holds the login's cookie. Without a
    ``session`` the client makes one and closes it on exit.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        prefix: str | None = None,
        session: aiohttp.ClientSession | None = None,
        deadline: float = 30.0,
        attempt_timeout: float = 10.0,
        first_backoff: float = 0.05,
        max_backoff: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if not (math.isfinite(deadline) and deadline > 0):
            raise ValueError(f"deadline must be finite and above 0 seconds, not {deadline!r}")
        if prefix is None:
            prefix = "" if token is None else "/api"
        self.url = base_url.rstrip("/") + prefix
        self._auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not secrets
        self._session = session
        self._own_session = session is None
        self._reads_url = base_url.rstrip("/") + "/api/counters"  # whatever ``prefix`` is

    async def __aenter__(self) -> IncrementClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def increment(
        self,
        key: str,
        value: int,
        *,
        durable: bool = False,
        return_value: bool = False,
        idempotency_key: str | None = None,
    ) -> Result:
        """Add ``value`` to the counter ``key``, exactly once. ``return_value`` (durable
        implied): ``Result.value`` is the counter's total right after this increment."""
        body = {"key": key, "value": value}
        return await self._send("/increment", body, durable, return_value, idempotency_key)

    async def increments(
        self,
        items: Sequence[tuple[str, int]],
        *,
        durable: bool = False,
        return_value: bool = False,
        idempotency_key: str | None = None,
    ) -> Result:
        """A batch of 1 to 1000 increments, applied whole, exactly once. ``return_value``
        (durable implied): ``Result.counters`` holds each counter's total right after it."""
        body = {"increments": [{"key": key, "value": value} for key, value in items]}
        return await self._send("/increments", body, durable, return_value, idempotency_key)

    async def _send(
        self,
        path: str,
        body: Mapping[str, Any],
        durable: bool,
        return_value: bool,
        idempotency_key: str | None,
    ) -> Result:
        key = idempotency_key or uuid.uuid4().hex
        headers = {**self._auth, "Idempotency-Key": key}
        if return_value:
            headers["Prefer"] = "durable, return=representation"
        elif durable:
            headers["Prefer"] = "durable"
        give_up_at = time.monotonic() + self.deadline
        attempts = 0
        # The last attempt's failure, and its status if it was answered.
        why = ""
        last_status: int | None = None
        while True:
            # Never past the deadline: an attempt's own timeout ends with it (and aiohttp
            # takes a timeout of 0 or less for none at all).
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                raise self._unknown(why, key, attempts, last_status)
            attempts += 1
            timeout = aiohttp.ClientTimeout(total=min(self.attempt_timeout, remaining))
            retry_after: float | None = None
            try:
                async with self.session.post(
                    self.url + path, json=body, headers=headers, timeout=timeout
                ) as response:
                    payload = await response.read()
                    status = response.status
                    if 200 <= status < 300:
                        return self._result(response, payload, key, attempts)
                    if status not in RETRIED_STATUSES:
                        raise _final(status, _problem(payload), key, attempts)
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    why, last_status = f"{status}", status
            except (aiohttp.ClientError, TimeoutError) as exc:
                why, last_status = type(exc).__name__, None
            wait = self._backoff(attempts, retry_after)
            now = time.monotonic()
            if now + wait >= give_up_at:
                if retry_after is not None and now + retry_after >= give_up_at:
                    why += f", Retry-After {retry_after:g} s ends past the deadline"
                raise self._unknown(why, key, attempts, last_status)
            await asyncio.sleep(wait)

    def _unknown(
        self, why: str, key: str, attempts: int, last_status: int | None
    ) -> IncrementFailed:
        return IncrementFailed(
            f"no definite answer within {self.deadline:g} s (last: {why}); the outcome is"
            " unknown, and a retry with the same idempotency_key is safe",
            key,
            attempts,
            status=last_status,
        )

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        # Full jitter: spread the retries of many clients after one outage.
        ceiling = min(self.max_backoff, self.first_backoff * 2 ** (attempts - 1))
        wait = self._rng.uniform(0, ceiling)
        return max(wait, retry_after) if retry_after is not None else wait

    @staticmethod
    def _result(
        response: aiohttp.ClientResponse, payload: bytes, key: str, attempts: int
    ) -> Result:
        applied = {
            preference.strip().lower()
            for preference in response.headers.get("Preference-Applied", "").split(",")
        }
        not_applied: tuple[int, ...] = ()
        counters: dict[str, int] | None = None
        if response.status == 200 and payload:
            answer = _problem(payload)
            items = answer.get("notApplied", [])
            not_applied = tuple(int(item["index"]) for item in items if "index" in item)
            if "return=representation" in applied:
                counters = {
                    str(c["key"]): int(c["value"])
                    for c in answer.get("counters", [])
                    if isinstance(c, dict) and "key" in c and "value" in c
                }
        return Result(response.status, key, attempts, "durable" in applied, not_applied, counters)

    async def _read(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One read, retried as increments are, until a 200 (its JSON) or the deadline."""
        # Unescaped UTF-8: 1000 keys of 256 characters fit the lookup's 1 MiB only so.
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        headers = dict(self._auth)  # a token with the read scope
        if body is not None:
            headers["Content-Type"] = "application/json"
        give_up_at = time.monotonic() + self.deadline
        attempts = 0
        why = ""
        last_status: int | None = None
        while True:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                raise self._read_failed(why, attempts, last_status)
            attempts += 1
            timeout = aiohttp.ClientTimeout(total=min(self.attempt_timeout, remaining))
            retry_after: float | None = None
            try:
                async with self.session.request(
                    method,
                    self._reads_url + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=timeout,
                ) as response:
                    payload = await response.read()
                    status = response.status
                    if status == 200:
                        return _problem(payload)  # a JSON object, as a problem is
                    if status not in RETRIED_STATUSES:
                        problem = _problem(payload)
                        raise ReadFailed(
                            f"{status}: {problem.get('detail') or 'no detail'}",
                            attempts,
                            status=status,
                            problem=problem,
                        )
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    why, last_status = f"{status}", status
            except (aiohttp.ClientError, TimeoutError) as exc:
                why, last_status = type(exc).__name__, None
            wait = self._backoff(attempts, retry_after)
            if time.monotonic() + wait >= give_up_at:
                raise self._read_failed(why, attempts, last_status)
            await asyncio.sleep(wait)

    def _read_failed(self, why: str, attempts: int, last_status: int | None) -> ReadFailed:
        return ReadFailed(
            f"no answer within {self.deadline:g} s (last: {why})", attempts, status=last_status
        )


def _final(status: int, problem: dict[str, Any], key: str, attempts: int) -> IncrementError:
    """The exception for an answer that is neither a 2xx nor retried."""
    if status == 422 and problem.get("type") == IDEMPOTENCY_KEY_REUSED:
        return IdempotencyKeyReused(status, problem, key, attempts)
    if 400 <= status < 500:
        return IncrementRejected(status, problem, key, attempts)
    detail = problem.get("detail", "")
    return IncrementFailed(
        f"{status}: {detail or 'no detail'}; the outcome is unknown, and a retry with the same"
        " idempotency_key is safe",
        key,
        attempts,
        status=status,
        problem=problem,
    )


def _problem(payload: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(payload or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` (RFC 9110 section 10.2.3): delay-seconds
    (``120``) or an HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``, and the two obsolete date
    forms), a date in the past being 0. None without one, or for a value neither form."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime's form has no zone: HTTP dates are in GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
