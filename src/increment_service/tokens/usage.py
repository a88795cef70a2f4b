"""``lastUsedAt``, written in batches: each process notes when each token was last used (a dict
write per request, verifier.py) and writes the lot every ``USAGE_FLUSH_SECONDS`` in one
statement, and once more at shutdown. So ``lastUsedAt`` lags the truth by up to that long."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from ..db import OUTAGE_ERRORS
from . import store
from .verifier import TokenVerifier

log = logging.getLogger(__name__)

USAGE_FLUSH_SECONDS = 10.0
_TIMEOUT_SECONDS = 5.0


class UsageWriter:
    def __init__(self, pool: asyncpg.Pool, verifier: TokenVerifier) -> None:
        self.pool = pool
        self.verifier = verifier
        self._task: asyncio.Task[None] | None = None

    async def write(self) -> bool:
        """Write what was used since the last write; on failure, keep it for the next."""
        used = self.verifier.take_used()
        if not used:
            return True
        try:
            async with self.pool.acquire(timeout=_TIMEOUT_SECONDS) as conn:
                await store.record_use(conn, used.items(), _TIMEOUT_SECONDS)
        except OUTAGE_ERRORS as exc:
            for token_id, when in used.items():  # newer uses noted meanwhile win
                self.verifier.used.setdefault(token_id, when)
            log.warning(
                "token usage not written; kept for the next write",
                extra={"event": "token-usage", "error": f"{type(exc).__name__}: {exc}"},
            )
            return False
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH_SECONDS)
            await self.write()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="token usage")

    async def close(self, within: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.write(), max(0.01, within))
