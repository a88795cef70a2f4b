"""What operators and their tools ask: readiness, liveness, the API document, metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import openapi
from ..appkeys import METRICS, PG_POOL, REDIS, WRITE_BEHIND
from . import json_response

HEALTH_TIMEOUT_SECONDS = 1.0


async def _check_postgres(app: web.Application) -> str:
    async with app[PG_POOL].acquire(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
        await conn.fetchval("SELECT 1", timeout=HEALTH_TIMEOUT_SECONDS)
    return "ok"


async def _check_redis(app: web.Application) -> str:
    await asyncio.wait_for(app[REDIS].ping(), HEALTH_TIMEOUT_SECONDS)
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
    checks["writeBehind"] = "error: MAX_PENDING_KEYS reached" if app[WRITE_BEHIND].is_full else "ok"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ok else "fail", "checks": checks}, 200 if ok else 503)


async def livez(request: web.Request) -> web.Response:
    """Alive: the event loop answers. No dependency checks (a Postgres outage is no reason to
    restart a replica that is buffering increments for it)."""
    return json_response({"status": "ok"})


async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
