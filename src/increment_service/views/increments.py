"""The counters: increments in, persisted values out."""

from __future__ import annotations

from aiohttp import web

from .. import counters, db, keys
from ..errors import NotFound
from ..validation import is_key, read_increment
from . import json_response

ACCEPTED = 202


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
    return json_response(counter)
