"""Revocations pushed by Postgres (LISTEN/NOTIFY): a connection of its own, for as long as the
app runs. Whenever it is (re)connected, every cached token is looked up again before its next
use: a notification sent while it was away is lost, and nothing may outlive it. (If the
connection dies without a word, the cache lifetime still bounds a revocation: verifier.py.)
Not Redis: tokens must not depend on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from ..db import OUTAGE_ERRORS
from .store import REVOKED_CHANNEL
from .verifier import TokenVerifier

log = logging.getLogger(__name__)

#: How often the connection is asked if it is alive (a connection that died without a FIN
#: says nothing otherwise).
PING_SECONDS = 5.0
_MAX_BACKOFF_SECONDS = 5.0
#: What ends a connection: an outage, or an error Postgres sent (terminated, say); also
#: asyncpg's own client errors (a connection terminated under an operation in progress can
#: leave its protocol in a state the next one refuses): the listener reconnects after any.
_LOST: tuple[type[BaseException], ...] = (
    *OUTAGE_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
#: How the listener's connection is named in pg_stat_activity.
APPLICATION_NAME = "increment-service token revocations"


class RevocationListener:
    def __init__(self, database_url: str, verifier: TokenVerifier) -> None:
        self.database_url = database_url
        self.verifier = verifier
        self.closing = False
        #: How many times the listener has been connected, and its backend's pid (the tests
        #: wait on the one and terminate the other).
        self.connections = 0
        self.backend_pid: int | None = None
        self._task: asyncio.Task[None] | None = None

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            key = bytes.fromhex(str(payload))
        except ValueError:
            return  # not ours
        self.verifier.evict(key)

    async def run(self) -> None:
        delay, connected = 0.1, True
        while not self.closing:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await asyncpg.connect(
                    self.database_url,
                    timeout=5,
                    server_settings={"application_name": APPLICATION_NAME},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(REVOKED_CHANNEL, self._notified)
                # Listening now: what was revoked before is found by looking up again.
                self.verifier.expire_all()
                self.connections += 1
                self.backend_pid = conn.get_server_pid()
                if not connected:
                    log.info("token revocations: listening again", extra={"event": "postgres"})
                connected, delay = True, 0.1
                while not self.closing and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING_SECONDS)
                    if not conn.is_closed():
                        await conn.execute("SELECT 1", timeout=PING_SECONDS)
            except _LOST as exc:
                if connected:
                    log.warning(
                        "token revocations: connection lost; retrying",
                        extra={"event": "postgres", "error": f"{type(exc).__name__}: {exc}"},
                    )
                connected = False
            finally:
                self.verifier.expire_all()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            if not self.closing:
                await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="token revocations")

    async def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            # Whatever its connection was doing ends here; nothing of it outlives the close.
            with contextlib.suppress(asyncio.CancelledError, *_LOST):
                await self._task
