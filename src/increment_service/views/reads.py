"""Counter reads beyond one key: many by name (``POST /api/counters/lookup``) and a page by
prefix in byte order (``GET /api/counters``). Persisted values: they lag the increments by up
to a flush interval, unless the increment was durable."""

from __future__ import annotations

from aiohttp import web

from .. import counters, db
from ..appkeys import PG_POOL
from ..validation.reads import read_lookup, read_page_query
from . import json_response


async def lookup(request: web.Request) -> web.Response:
    """POST /api/counters/lookup: the counters of up to 1000 keys, and the keys never persisted."""
    keys = await read_lookup(request)
    async with db.connection(request.app[PG_POOL], "counter database") as conn:
        found, missing = await counters.get_many(conn, keys)
    return json_response({"counters": found, "missing": missing})


async def list_counters(request: web.Request) -> web.Response:
    """GET /api/counters?prefix=&after=&limit=: a page of the counters whose key starts with
    ``prefix``, in byte order, and ``next``: the ``after`` of the next page, null at the end."""
    query = read_page_query(request.query)
    async with db.connection(request.app[PG_POOL], "counter database") as conn:
        page, following = await counters.page(conn, query.prefix, query.after, query.limit)
    return json_response({"counters": page, "next": following})
