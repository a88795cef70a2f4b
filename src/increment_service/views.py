"""HTTP handlers: thin, with validation at the edge and storage behind a connection."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from . import counters, db, keys
from .errors import NotFound
from .validation import is_key, read_increment

log = logging.getLogger(__name__)

ACCEPTED = 202
HEALTH_TIMEOUT_SECONDS = 1.0


async def increment(request: web.Request) -> web.Response:
    key, value = await read_increment(request)
    app = request.app
    app[keys.WRITE_BEHIND].add(key, value)
    app[keys.METRICS].increments.inc()
    return web.Response(status=ACCEPTED)


async def get_counter(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if not is_key(key):  # a NUL, say: no counter can have it, and Postgres text cannot hold it
        raise NotFound("no counter has that key")
    async with db.connection(request.app[keys.PG_POOL], "counter database") as conn:
        counter = await counters.get(conn, key)
    if counter is None:
        raise NotFound("no counter with that key has been persisted")
    return web.json_response(counter, dumps=counters.dumps)


async def _check_postgres(app: web.Application) -> str:
    async with app[keys.PG_POOL].acquire(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
        await conn.fetchval("SELECT 1", timeout=HEALTH_TIMEOUT_SECONDS)
    return "ok"


async def _check_redis(app: web.Application) -> str:
    await asyncio.wait_for(app[keys.REDIS].ping(), HEALTH_TIMEOUT_SECONDS)
    return "ok"


async def health(request: web.Request) -> web.Response:
    """Ready to serve: Postgres and Redis answer and the write-behind takes new keys."""
    app = request.app
    results = await asyncio.gather(_check_postgres(app), _check_redis(app), return_exceptions=True)
    checks: dict[str, str] = {}
    for name, result in zip(("postgres", "redis"), results, strict=True):
        if isinstance(result, BaseException):
            checks[name] = f"error: {type(result).__name__}"
        else:
            checks[name] = result
    write_behind = app[keys.WRITE_BEHIND]
    checks["writeBehind"] = (
        "error: MAX_PENDING_KEYS reached" if write_behind.aggregator.is_full else "ok"
    )
    ok = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if ok else "fail", "checks": checks},
        status=200 if ok else 503,
        dumps=counters.dumps,
    )


async def livez(request: web.Request) -> web.Response:
    """Alive: the event loop answers. No dependency checks (a Postgres outage is no reason to
    restart a replica that is buffering increments for it)."""
    return web.json_response({"status": "ok"})
