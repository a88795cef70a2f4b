"""A small asyncio client that makes retries safe (aiohttp only).

Every operation gets an ``Idempotency-Key`` of its own, and every retry of it sends the same
key, so an increment whose answer was lost (a 502 or 504 from the load balancer, a reset, a
timeout) can be sent again without ever counting twice::

    async with IncrementClient("http://localhost:3333") as client:
        await client.increment("apples", 5)
        await client.increments([("apples", 1), ("pears", 2)])
        await client.increment("invoices", 1, durable=True)  # answered after the commit

What is retried: 409 (a durable first attempt with this key is still waiting for its commit),
502, 503 and 504, connection errors and timeouts; with backoff (exponential, full jitter,
``Retry-After`` honoured) until a total deadline. Any other answer is final: a 2xx is success,
a 4xx raises ``IncrementRejected`` (nothing was applied). A deadline that runs out raises
``IncrementFailed``: then the outcome is unknown, and calling again with the same
``idempotency_key`` (``IncrementFailed.idempotency_key``) is still safe within the server's
``IDEMPOTENCY_TTL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

RETRIED_STATUSES = frozenset({409, 502, 503, 504})


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


class IncrementError(Exception):
    def __init__(self, message: str, idempotency_key: str, attempts: int) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.attempts = attempts


class IncrementRejected(IncrementError):
    """A definite no (a 4xx other than 409): nothing was applied; retrying will not help."""

    def __init__(
        self, status: int, problem: Mapping[str, Any], idempotency_key: str, attempts: int
    ) -> None:
        detail = problem.get("detail", "")
        super().__init__(f"{status}: {detail}", idempotency_key, attempts)
        self.status = status
        self.problem = dict(problem)


class IncrementFailed(IncrementError):
    """The deadline ran out: the outcome is unknown. A retry with the same key is safe."""


class IncrementClient:
    """Sends increments to one base URL (a load balancer, say), retrying safely.

    ``prefix="/api"`` uses the session routes (``/api/increment``, ``/api/increments``): give a
    ``session`` whose cookie jar holds the login's cookie. Without a ``session`` the client
    makes one and closes it on exit.
    """

    def __init__(
        self,
        base_url: str,
        *,
        prefix: str = "",
        session: aiohttp.ClientSession | None = None,
        deadline: float = 30.0,
        attempt_timeout: float = 10.0,
        first_backoff: float = 0.05,
        max_backoff: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + prefix
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not secrets
        self._session = session
        self._own_session = session is None

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
        idempotency_key: str | None = None,
    ) -> Result:
        """Add ``value`` to the counter ``key``, exactly once."""
        return await self._send(
            "/increment", {"key": key, "value": value}, durable, idempotency_key
        )

    async def increments(
        self,
        items: Sequence[tuple[str, int]],
        *,
        durable: bool = False,
        idempotency_key: str | None = None,
    ) -> Result:
        """A batch of 1 to 1000 increments, applied whole, exactly once."""
        body = {"increments": [{"key": key, "value": value} for key, value in items]}
        return await self._send("/increments", body, durable, idempotency_key)

    async def _send(
        self, path: str, body: Mapping[str, Any], durable: bool, idempotency_key: str | None
    ) -> Result:
        key = idempotency_key or uuid.uuid4().hex
        headers = {"Idempotency-Key": key}
        if durable:
            headers["Prefer"] = "durable"
        give_up_at = time.monotonic() + self.deadline
        attempts = 0
        while True:
            attempts += 1
            remaining = give_up_at - time.monotonic()
            timeout = aiohttp.ClientTimeout(total=max(0.05, min(self.attempt_timeout, remaining)))
            retry_after: float | None = None
            try:
                async with self.session.post(
                    self.url + path, json=body, headers=headers, timeout=timeout
                ) as response:
                    payload = await response.read()
                    if 200 <= response.status < 300:
                        return self._result(response, payload, key, attempts)
                    if response.status not in RETRIED_STATUSES:
                        raise IncrementRejected(response.status, _problem(payload), key, attempts)
                    retry_after = _seconds(response.headers.get("Retry-After"))
                    why = f"{response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
            wait = self._backoff(attempts, retry_after)
            if time.monotonic() + wait >= give_up_at:
                raise IncrementFailed(
                    f"no definite answer within {self.deadline} s (last: {why}); the outcome"
                    " is unknown, and a retry with the same idempotency_key is safe",
                    key,
                    attempts,
                )
            await asyncio.sleep(wait)

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        # Full jitter: spread the retries of many clients after one outage.
        ceiling = min(self.max_backoff, self.first_backoff * 2 ** (attempts - 1))
        wait = self._rng.uniform(0, ceiling)
        return max(wait, retry_after) if retry_after is not None else wait

    @staticmethod
    def _result(
        response: aiohttp.ClientResponse, payload: bytes, key: str, attempts: int
    ) -> Result:
        durable = response.headers.get("Preference-Applied", "").lower() == "durable"
        not_applied: tuple[int, ...] = ()
        if response.status == 200 and payload:
            items = _problem(payload).get("notApplied", [])
            not_applied = tuple(int(item["index"]) for item in items if "index" in item)
        return Result(response.status, key, attempts, durable, not_applied)


def _problem(payload: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(payload or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form, which the service sends)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
