"""The service in this process, through aiohttp's test client: the client's type, and a
replica whose Postgres connections go through a CuttingProxy (the ``proxied`` fixture)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient

from increment_service.writebehind import APPLY_BATCH_SQL, WriteBehind
from tests.support.postgres import CuttingProxy

#: What pytest-aiohttp's ``aiohttp_client(app)`` gives.
Client = TestClient[web.Request, web.Application]
#: The ``replica`` fixture: ``await replica(**changes)`` is another replica of the test database.
MakeReplica = Callable[..., Awaitable[Client]]


def base_url(client: Client) -> str:
    """Where an in-process app listens, e.g. ``http://127.0.0.1:41234``."""
    return str(client.make_url("")).rstrip("/")


@dataclasses.dataclass
class Proxied:
    """An in-process service whose Postgres connections go through a CuttingProxy; its timer
    never flushes during a test (9 s): only explicit flush() calls do (and durable groups)."""

    client: Client
    proxy: CuttingProxy
    write_behind: WriteBehind

    async def warm_up(self) -> None:
        """Flush a first batch: it opens the pooled connection and prepares the statement, so
        the next flush is a single request on that connection (the one the proxy cuts). The
        statement a batch with rejections or wide deltas takes is prepared too (an empty
        batch of its own id)."""
        response = await self.client.post("/increment", json={"key": "warm", "value": 1})
        assert response.status == 202, await response.text()
        assert await self.write_behind.flush()
        async with self.write_behind.pool.acquire() as conn:
            await conn.fetchrow(APPLY_BATCH_SQL, "warm-up", 1, "", "", [], [])

    async def flush_with_the_answer_cut(self) -> None:
        """Flush once through the armed proxy: the server commits, the client's line dies."""
        self.proxy.armed = True
        assert not await self.write_behind.flush(), "the client saw its connection die"
        assert self.proxy.cuts == 1
