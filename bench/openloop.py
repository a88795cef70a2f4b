"""An open-loop load generator: requests at a fixed offered rate, whatever the server does.

wrk is a closed loop: each of its connections sends the next request when the previous answer
arrives, so a slower server is offered less load, and a stall delays the requests that would
have been sent meanwhile instead of making them wait (coordinated omission). Two systems
driven by wrk are therefore compared at different loads. Here request ``i`` is *scheduled* at
``start + i / rate``; its latency is measured from that scheduled time to the end of its
answer, so time spent waiting for a free connection, or behind a stalled one, counts.

Each generator process keeps ``connections`` keep-alive HTTP/1.1 connections (one request at
a time on each, no pipelining); a request whose time has come while every connection is busy
waits in a queue, and its latency includes the wait. The HTTP client is a minimal
``asyncio.Protocol`` on uvloop (about half of aiohttp's client CPU per request here), so the
generator takes little of the cores it shares with the server. Several processes split the
rate (``processes``), each with its own connections, its schedule offset so the sends
interleave.

What a request is: ``path``, ``headers``, ``method`` and ``body``, a picklable callable
(a module-level function or a ``functools.partial`` of one) from the request's number to its
body bytes. For example the durable acknowledgements at 1,000 increments/s::

    plan = Plan(url, "/increment", rate=1000, duration=60,
                headers={"Content-Type": "application/json", "Prefer": "durable"},
                body=functools.partial(increment_body, prefix="durable", keys=1000))
    result = await run(plan)          # or run_sync(plan) outside an event loop

or from the command line (``python -m bench.openloop --help``).

A result gives the latency from the scheduled time (p50 ... max), the service time (from
the write of the request to its answer, what a closed loop would see), the send lag (from the
scheduled time to the write: the wait for a free connection, plus the generator's own lag),
the generator lag (from the scheduled time to the moment the generator took the request up:
its own lateness, e.g. when it did not get a core; it counts in the latency too, so a large
one makes the figures pessimistic), the statuses, the errors and the achieved rate. The first
``warmup`` seconds are sent but left out of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import random
import resource
import sys
import time
import typing
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

BodyMaker = Callable[[int], bytes]
#: The dispatcher wakes this often (and after every answer): a request is sent up to about
#: this late, which its latency includes (the send lag shows it).
TICK = 0.001


def increment_body(n: int, prefix: str = "openloop", keys: int = 1000) -> bytes:
    """``{"key": "<prefix>:<k>", "value": 1}`` with ``k`` drawn at random from 1..keys."""
    return b'{"key":"%s:%d","value":1}' % (prefix.encode(), random.randint(1, keys))


def percentile(values: Sequence[float], p: float, presorted: bool = False) -> float | None:
    """Nearest-rank percentile (None for no values): the p99 of 600 samples is the 6th
    largest; of 100 samples or fewer it is their maximum."""
    if not values:
        return None
    ordered = values if presorted else sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclasses.dataclass(frozen=True)
class Plan:
    url: str  # http://host:port
    path: str
    rate: float  # requests per second offered, over all processes
    duration: float  # seconds of sending, warm-up included
    body: BodyMaker = increment_body
    headers: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"Content-Type": "application/json"}
    )
    method: str = "POST"
    connections: int = 64  # over all processes
    processes: int = 1
    warmup: float = 2.0
    timeout: float = 10.0  # a request unanswered this long after its scheduled time is lost
    # The path (and query) of request n, when it varies (a picklable callable, as ``body``);
    # ``path`` then only names the plan in its result.
    target: Callable[[int], str] | None = None


@dataclasses.dataclass
class Latency:
    """Milliseconds; nearest-rank percentiles."""

    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        if not seconds:
            return cls()
        ordered = sorted(seconds)

        def at(p: float) -> float:
            value = percentile(ordered, p, presorted=True)
            assert value is not None  # ordered has values
            return round(1000 * value, 3)

        return cls(at(50), at(90), at(99), at(99.9), round(1000 * ordered[-1], 3))


@dataclasses.dataclass
class Result:
    path: str
    offered_rate: float
    duration_s: float
    measured_s: float  # the window the figures cover (duration minus warm-up)
    connections: int
    processes: int
    scheduled: int  # in the measured window
    completed: int  # answered, any status
    lost: int  # never answered within the timeout, or failed (see errors)
    achieved_rate: float  # answers per second in the measured window
    statuses: dict[str, int]
    errors: dict[str, int]
    latency: Latency  # from the scheduled time: what a client at this rate sees
    service_time: Latency  # from the write: what a closed loop like wrk reports
    send_lag: Latency  # scheduled -> written: the generator's lag plus the wait for a connection
    generator_lag: Latency  # scheduled -> taken up by the generator: its own lateness alone
    generator_cpu_s: float  # user + system CPU of the generator processes

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- one generator process ------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, on_answer: Callable[[_Connection, int | None, str | None], None]) -> None:
        self._on_answer = on_answer
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed"))
        if self.busy:
            self.busy = False
            self._on_answer(self, None, "closed")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self.busy:
            answer = _parse_response(self._buffer)
            if answer is None:
                return
            status, consumed, close = answer
            del self._buffer[:consumed]
            self.busy = False
            if close and self.transport is not None:
                self.transport.close()  # connection_lost marks it closed: it is reopened
            self._on_answer(self, status, None)


def _parse_response(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes used, server closes) of the complete response at the buffer's start, or
    None if it is not all there yet. Content-Length and chunked bodies; no 1xx."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = 0
    chunked = close = False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            close = "close" in value.lower()
    position = end + 4
    if not chunked:
        if len(buffer) < position + length:
            return None
        return status, position + length, close
    while True:  # chunk-size line, chunk, CRLF; the last chunk is 0, then trailers
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailers_end = buffer.find(b"\r\n\r\n", position - 2)
            return None if trailers_end < 0 else (status, trailers_end + 4, close)
        if len(buffer) < position + size + 2:
            return None
        position += size + 2


class _Generator:
    def __init__(self, plan: Plan, index: int, start: float, count: int) -> None:
        url = urlsplit(plan.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.plan = plan
        self.interval = plan.processes / plan.rate
        self.start = start + index / plan.rate  # the processes' sends interleave
        self.count = count
        self.head = self._head().encode("latin-1")
        self.connections = max(1, plan.connections // plan.processes)
        self.free: collections.deque[_Connection] = collections.deque()
        self.waiting: collections.deque[int] = collections.deque()
        self.on_wire: dict[_Connection, int] = {}
        self.dispatched_at = array("d", [math.nan]) * count
        self.sent_at = array("d", [math.nan]) * count
        self.done_at = array("d", [math.nan]) * count
        self.status = array("h", [0]) * count
        self.errors: collections.Counter[str] = collections.Counter()
        self.outstanding = 0
        self.next = 0  # the next request to schedule
        self.finished = asyncio.get_running_loop().create_future()

    def _head(self, path: str | None = None) -> str:
        headers = {"Host": f"{self.host}:{self.port}", **self.plan.headers}
        lines = [f"{self.plan.method} {path or self.plan.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return "\r\n".join(lines) + "\r\nContent-Length: "

    def request(self, n: int) -> bytes:
        body = self.plan.body(n)
        head = self.head
        if self.plan.target is not None:
            head = self._head(self.plan.target(n)).encode("latin-1")
        return b"%s%d\r\n\r\n%s" % (head, len(body), body)

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(self._answered), self.host, self.port
        )
        await connection.connected
        return connection

    async def _reopen(self) -> None:
        try:
            connection = await self.connect()
        except OSError as exc:
            self.errors[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)
            asyncio.get_running_loop().create_task(self._reopen())
            return
        self._give(connection)

    def _take_free(self) -> _Connection | None:
        while self.free:
            connection = self.free.popleft()
            if not connection.closed:
                return connection
            asyncio.get_running_loop().create_task(self._reopen())  # the server closed it
        return None

    def _give(self, connection: _Connection) -> None:
        if self.waiting:
            self._send(connection, self.waiting.popleft())
        else:
            self.free.append(connection)

    def _send(self, connection: _Connection, n: int) -> None:
        self.on_wire[connection] = n
        self.sent_at[n] = time.perf_counter()
        connection.send(self.request(n))

    def _answered(self, connection: _Connection, status: int | None, error: str | None) -> None:
        n = self.on_wire.pop(connection)
        self.done_at[n] = time.perf_counter()
        if error is None:
            assert status is not None
            self.status[n] = status
        else:
            self.errors[error] += 1
        self.outstanding -= 1
        if connection.closed:
            asyncio.get_running_loop().create_task(self._reopen())
        else:
            self._give(connection)
        if self.next < self.count:
            self._dispatch()
        if self.outstanding == 0 and not self.finished.done():
            self.finished.set_result(None)

    def _dispatch(self) -> None:
        """Send (or queue for a connection) every request whose scheduled time has come."""
        now = time.perf_counter()
        n = self.next
        while n < self.count and self.start + n * self.interval <= now:
            self.dispatched_at[n] = now
            connection = self._take_free()
            if connection is None:
                self.waiting.append(n)
            else:
                self._send(connection, n)
            n += 1
        self.next = n

    async def run(self) -> None:
        if not self.count:
            return
        for connection in await asyncio.gather(*(self.connect() for _ in range(self.connections))):
            self.free.append(connection)
        self.outstanding = self.count
        while self.next < self.count:
            self._dispatch()
            # uvloop's timers count whole milliseconds (a shorter sleep would spin); answers
            # arriving in between dispatch too (_answered), so at high rates sends are prompt.
            await asyncio.sleep(TICK)
        last_scheduled = self.start + (self.count - 1) * self.interval
        with contextlib.suppress(TimeoutError):
            timeout = max(0.0, last_scheduled + self.plan.timeout - time.perf_counter())
            await asyncio.wait_for(asyncio.shield(self.finished), timeout)
        for connection in [*self.free, *self.on_wire]:
            if connection.transport is not None:
                connection.transport.close()


def _process_main(plan: Plan, index: int, start_wall: float) -> dict[str, Any]:
    """One generator process: run its share of the plan, return its raw figures."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    count = math.floor(plan.duration * plan.rate / plan.processes)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)

    async def main() -> dict[str, Any]:
        start = time.perf_counter() + (start_wall - time.time())
        generator = _Generator(plan, index, start, count)
        await generator.run()
        return {
            "start": generator.start,
            "interval": generator.interval,
            "dispatched_at": generator.dispatched_at.tolist(),
            "sent_at": generator.sent_at.tolist(),
            "done_at": generator.done_at.tolist(),
            "status": generator.status.tolist(),
            "errors": dict(generator.errors),
        }

    raw = asyncio.run(main())
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    raw["cpu_s"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    return raw


def _ready() -> bool:
    return True


def _summarize(plan: Plan, raws: list[dict[str, Any]]) -> Result:
    latency: list[float] = []
    service: list[float] = []
    lag: list[float] = []
    late: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    scheduled = lost = 0
    measured = plan.duration - plan.warmup
    for raw in raws:
        errors.update(raw["errors"])
        rows = zip(raw["dispatched_at"], raw["sent_at"], raw["done_at"], raw["status"], strict=True)
        for n, (dispatched, sent, done, status) in enumerate(rows):
            offset = n * raw["interval"]
            if offset < plan.warmup:
                continue
            scheduled += 1
            due = raw["start"] + offset
            if not math.isnan(dispatched):
                late.append(dispatched - due)
            if math.isnan(done) or status == 0:
                lost += 1
                continue
            statuses[str(status)] += 1
            latency.append(done - due)
            service.append(done - sent)
            lag.append(sent - due)
    completed = len(latency)
    return Result(
        path=plan.path,
        offered_rate=plan.rate,
        duration_s=plan.duration,
        measured_s=measured,
        connections=plan.connections,
        processes=plan.processes,
        scheduled=scheduled,
        completed=completed,
        lost=lost,
        achieved_rate=round(completed / measured, 1) if measured > 0 else 0.0,
        statuses=dict(statuses),
        errors=dict(errors),
        latency=Latency.of(latency),
        service_time=Latency.of(service),
        send_lag=Latency.of(lag),
        generator_lag=Latency.of(late),
        generator_cpu_s=round(sum(raw["cpu_s"] for raw in raws), 3),
    )


def run_sync(plan: Plan) -> Result:
    """Run a plan from outside an event loop: the generator processes are spawned, warmed up
    (imported, so the schedule's start does not wait for them), then started together."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(plan.processes, mp_context=context) as pool:
        for ready in [pool.submit(_ready) for _ in range(plan.processes)]:
            ready.result()
        start_wall = time.time() + 0.5  # time for every process to open its connections
        futures = [pool.submit(_process_main, plan, i, start_wall) for i in range(plan.processes)]
        raws = [future.result() for future in futures]
    return _summarize(plan, raws)


async def run(plan: Plan) -> Result:
    """Run a plan from inside an event loop (in a thread: the loop keeps serving its tasks)."""
    return await asyncio.to_thread(run_sync, plan)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("url", help="http://127.0.0.1:PORT (loopback)")
    parser.add_argument("--path", default="/increment")
    parser.add_argument("--rate", type=float, required=True, help="requests/s offered")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--keys", type=int, default=1000, help="random keys of the body")
    parser.add_argument("--prefix", default="openloop", help="key prefix of the body")
    parser.add_argument(
        "--header", action="append", default=[], help="NAME: VALUE, repeatable (e.g. Cookie)"
    )
    args = parser.parse_args(argv)
    headers = {"Content-Type": "application/json"}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    plan = Plan(
        args.url,
        args.path,
        args.rate,
        args.duration,
        body=functools.partial(increment_body, prefix=args.prefix, keys=args.keys),
        headers=headers,
        connections=args.connections,
        processes=args.processes,
        warmup=args.warmup,
    )
    print(json.dumps(run_sync(plan).as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
