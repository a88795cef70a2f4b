"""``Traffic``: the one load generator of the tests, and ``Sent``, its record of a request;
and how to judge what the counters hold against the traffic (``unexplained``)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from tests.support.postgres import persisted

Item = tuple[str, int]  # (key, value) of one increment

#: The promise: Postgres is at most this far behind an acknowledged increment.
PROMISE_SECONDS = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """One increment sent, and what came back."""

    request_id: str
    key: str
    value: int
    sent_at: float  # time.monotonic()
    answered_at: float  # time.monotonic() when the answer, or the failure, came
    status: int | None  # None: no HTTP answer (connection error, client timeout)
    retry_after: str | None

    @property
    def acknowledged(self) -> bool:
        return self.status == 202

    @property
    def refused(self) -> bool:
        """Answered by the service with a definite no: nothing was counted."""
        return self.status is not None and (400 <= self.status < 500 or self.status == 503)

    @property
    def unknown(self) -> bool:
        """Attempted, outcome unknown: no answer, or a gateway error (502/504) from the load
        balancer after the request may have reached a replica."""
        return not self.acknowledged and not self.refused


class Traffic:
    """Increments sent back to back by ``concurrency`` clients, spread over ``base_urls``.

    ``items`` is a list (each sent once: ``await Traffic(...).run()``) or a function making
    the n-th (key, value), sent until stopped (``async with Traffic(...) as traffic:``) and at
    most ``limit`` times, so a test that forgets to stop stays bounded. Each request carries
    an X-Request-ID of its own, so a load balancer's access log says which replica answered
    it. Every request is recorded (``sent``, ``acks``) with its outcome and times, live: a test
    can wait for progress between the phases of a fault.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        items: Sequence[Item] | Callable[[int], Item],
        *,
        concurrency: int = 16,
        limit: int = 200_000,
        path: str = "/increment",
        prefix: str = "req",
    ) -> None:
        bases = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.urls = [base.rstrip("/") + path for base in bases]
        if callable(items):
            self.item = items
            self.limit = limit
        else:
            self.item = list(items).__getitem__
            self.limit = min(limit, len(items))
        self.concurrency = concurrency
        self.prefix = prefix
        self.sent: list[Sent] = []  # every request, in the order the answers came
        self.acks: list[Sent] = []  # the acknowledged ones (202): the timeline of a fault
        self.started = 0
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._tasks = [
            asyncio.create_task(self._worker(self.urls[n % len(self.urls)]))
            for n in range(self.concurrency)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> Traffic:
        """Send every item (``limit`` of them), then return this traffic, finished."""
        async with self:
            await asyncio.gather(*self._tasks)
        return self

    async def _worker(self, url: str) -> None:
        assert self._session is not None
        while not self._stop.is_set() and self.started < self.limit:
            n = self.started
            self.started += 1
            key, value = self.item(n)
            request_id = f"{self.prefix}-{n}"
            status: int | None = None
            retry_after: str | None = None
            sent_at = time.monotonic()
            try:
                async with self._session.post(
                    url, json={"key": key, "value": value}, headers={"X-Request-ID": request_id}
                ) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError):
                pass
            sent = Sent(request_id, key, value, sent_at, time.monotonic(), status, retry_after)
            self.sent.append(sent)
            if sent.acknowledged:
                self.acks.append(sent)
            else:
                await asyncio.sleep(0.01)  # a refusal or a failure: do not spin

    async def wait_for_acks(self, count: int, within: float = 15.0) -> None:
        """Wait until ``count`` increments in all have been acknowledged."""
        deadline = time.monotonic() + within
        while len(self.acks) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.acks)} of {count} increments acknowledged in {within}s"
                    f" (statuses {dict(self.statuses())})"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop sending; the requests in flight finish and are recorded."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def statuses(self) -> Counter[int | None]:
        """How many requests got each status (None: no answer)."""
        return Counter(s.status for s in self.sent)

    def attempted(self) -> Counter[str]:
        """Per key, the sum of every value sent, whatever came back."""
        totals: Counter[str] = Counter()
        for s in self.sent:
            totals[s.key] += s.value
        return totals

    def acknowledged(self) -> Counter[str]:
        """Per key, the sum of the values acknowledged with 202."""
        totals: Counter[str] = Counter()
        for s in self.acks:
            totals[s.key] += s.value
        return totals

    def unknown(self) -> list[Sent]:
        """The requests whose outcome is unknown (no answer, or a 502/504 from a gateway)."""
        return [s for s in self.sent if s.unknown]


def unexplained(got: Mapping[str, int], traffic: Traffic) -> dict[str, str]:
    """Keys whose persisted total is not "everything acknowledged plus some subset of the
    increments whose outcome is unknown" (an empty dict is the exact result)."""
    acknowledged = traffic.acknowledged()
    unknown: dict[str, list[int]] = defaultdict(list)
    for sent in traffic.unknown():
        unknown[sent.key].append(sent.value)
    bad = {}
    for key in set(got) | set(acknowledged) | set(unknown):
        possible = {0}
        for value in unknown.get(key, []):
            possible |= {p + value for p in possible}
        extra = got.get(key, 0) - acknowledged[key]
        if extra not in possible:
            bad[key] = (
                f"persisted {got.get(key, 0)}, acknowledged {acknowledged[key]}, "
                f"unknown outcomes {unknown.get(key, [])}"
            )
    return bad


async def wait_until_explained(
    database_url: str, traffic: Traffic, within: float = PROMISE_SECONDS
) -> tuple[dict[str, int], float]:
    """Poll until the counters are exactly explained by the traffic: (counters, seconds)."""
    started = time.monotonic()
    while True:
        got = await persisted(database_url)
        if not unexplained(got, traffic) or time.monotonic() - started > within:
            return got, time.monotonic() - started
        await asyncio.sleep(0.1)


def lb_statuses(traffic: Traffic) -> dict[str, int]:
    """Statuses as a load balancer's clients saw them ("no answer" for None), for messages."""
    counts = traffic.statuses()
    return {("no answer" if s is None else str(s)): n for s, n in sorted(counts.items(), key=str)}
