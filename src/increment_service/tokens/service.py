"""The tokens of one app: the check (verifier.py), the revocations it listens for
(listener.py) and the usage it writes (usage.py), started and closed together."""

from __future__ import annotations

import asyncpg

from ..metrics import Metrics
from .listener import RevocationListener
from .usage import UsageWriter
from .verifier import TokenVerifier


class Tokens:
    def __init__(self, pool: asyncpg.Pool, database_url: str, metrics: Metrics) -> None:
        self.verifier = TokenVerifier(pool, metrics)
        self.listener = RevocationListener(database_url, self.verifier)
        self.usage = UsageWriter(pool, self.verifier)

    def start(self) -> None:
        self.listener.start()
        self.usage.start()

    async def close(self, within: float) -> None:
        """Before the pool closes: the last usage written, the lookups and listener stopped."""
        await self.listener.close()
        await self.verifier.close()
        await self.usage.close(within)
