"""The counters: increments in (one or a batch; with or without an Idempotency-Key; written
behind, or durably with ``Prefer: durable``), persisted values out."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from .. import counters, db
from ..appkeys import PG_POOL, USER_ID, WRITE_BEHIND
from ..errors import NotFound
from ..validation.headers import prefers_durable, prefers_representation, read_idempotency_key
from ..validation.increments import is_key, read_increment, read_increments
from ..writebehind import Accepted
from . import json_response

ACCEPTED = 202
COMMITTED = 204
DURABLE_APPLIED = {"Preference-Applied": "durable"}
REPRESENTATION_APPLIED = {"Preference-Applied": "durable, return=representation"}


async def increment(request: web.Request) -> web.Response:
    """POST /increment and /api/increment: one increment."""
    idempotency_key = read_idempotency_key(request)
    key, value = await read_increment(request)
    if idempotency_key is None and "Prefer" not in request.headers:
        # The default path: summed into the replica's dict, no I/O.
        request.app[WRITE_BEHIND].add(key, value)
        return web.Response(status=ACCEPTED)
    return await _accept(request, idempotency_key, "single", ((key, value),))


async def increment_batch(request: web.Request) -> web.Response:
    """POST /increments and /api/increments: 1 to 1000 increments, admitted or refused whole."""
    idempotency_key = read_idempotency_key(request)
    items = await read_increments(request)
    return await _accept(request, idempotency_key, "batch", items)


async def _accept(
    request: web.Request,
    idempotency_key: str | None,
    kind: str,
    items: Sequence[tuple[str, int]],
) -> web.Response:
    accepted = await request.app[WRITE_BEHIND].accept(
        items,
        kind=kind,
        idempotency_key=idempotency_key,
        # A session's and a token's requests share their user's scope (accept.scope_of).
        user_id=request.get(USER_ID),
        durable=prefers_durable(request),
        representation=prefers_representation(request),
    )
    return _answer(accepted)


def _answer(accepted: Accepted) -> web.Response:
    if not accepted.committed:
        return web.Response(status=ACCEPTED)
    # Some items not applied: never a plain 204. Which ones, by their index.
    not_applied = [
        {"index": item.index, "key": item.key, "reason": item.reason}
        for item in accepted.not_applied
    ]
    if accepted.totals is not None:
        at = accepted.totals.at.isoformat()
        counters = [
            {"key": key, "value": value, "updatedAt": at} for key, value in accepted.totals.counters
        ]
        body = {"counters": counters, "notApplied": not_applied}
        return json_response(body, headers=REPRESENTATION_APPLIED)
    if not_applied:
        return json_response({"notApplied": not_applied}, headers=DURABLE_APPLIED)
    return web.Response(status=COMMITTED, headers=DURABLE_APPLIED)


async def get_counter(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if not is_key(key):  # a NUL, say: no counter can have it, and Postgres text cannot hold it
        raise NotFound("no counter has that key")
    async with db.connection(request.app[PG_POOL], "counter database") as conn:
        counter = await counters.get(conn, key)
    if counter is None:
        raise NotFound("no counter with that key has been persisted")
    return json_response(counter)
