"""The counters: increments in (one, or a batch; with or without an Idempotency-Key),
persisted values out."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from .. import counters, db, keys
from ..errors import IdempotencyKeyReused, NotFound
from ..validation import (
    fingerprint,
    is_key,
    read_idempotency_key,
    read_increment,
    read_increments,
)
from ..writebehind import Keyed, KeyedOutcome
from . import json_response

ACCEPTED = 202
#: The one scope of the open routes' idempotency keys (a session's user has a scope of its own).
OPEN_SCOPE = "open"


async def increment(request: web.Request) -> web.Response:
    """POST /increment and /api/increment: one increment."""
    idempotency_key = read_idempotency_key(request)
    key, value = await read_increment(request)
    app = request.app
    if idempotency_key is None:  # the default path: summed into the replica's dict
        app[keys.WRITE_BEHIND].add(key, value)
        app[keys.METRICS].increments.inc()
        return web.Response(status=ACCEPTED)
    return _keyed(request, idempotency_key, "single", ((key, value),))


async def increment_batch(request: web.Request) -> web.Response:
    """POST /increments and /api/increments: 1 to 1000 increments, admitted or refused whole."""
    idempotency_key = read_idempotency_key(request)
    items = await read_increments(request)
    app = request.app
    if idempotency_key is None:
        app[keys.WRITE_BEHIND].add_many(items)
        app[keys.METRICS].increments.inc(len(items))
        return web.Response(status=ACCEPTED)
    return _keyed(request, idempotency_key, "batch", items)


def _keyed(
    request: web.Request, idempotency_key: str, kind: str, items: Sequence[tuple[str, int]]
) -> web.Response:
    """A keyed request: applied at most once per key, across replicas and restarts."""
    session = request.get(keys.SESSION)
    scope = OPEN_SCOPE if session is None else f"user:{session.user_id}"
    keyed = Keyed(scope, idempotency_key, fingerprint(kind, items), tuple(items))
    app = request.app
    outcome = app[keys.WRITE_BEHIND].add_keyed(keyed)
    if outcome is KeyedOutcome.CONFLICT:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for another request; nothing was applied"
        )
    if outcome is KeyedOutcome.ACCEPTED:
        app[keys.METRICS].increments.inc(len(items))
    return web.Response(status=ACCEPTED)  # a replay gets the answer the first one got


async def get_counter(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if not is_key(key):  # a NUL, say: no counter can have it, and Postgres text cannot hold it
        raise NotFound("no counter has that key")
    async with db.connection(request.app[keys.PG_POOL], "counter database") as conn:
        counter = await counters.get(conn, key)
    if counter is None:
        raise NotFound("no counter with that key has been persisted")
    return json_response(counter)
