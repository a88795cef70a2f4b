"""The counters: increments in (one or a batch; with or without an Idempotency-Key; written
behind, or durably with ``Prefer: durable``), persisted values out."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from .. import counters, db, keys
from ..errors import IdempotencyKeyReused, KeyInUse, NotCommitted, NotFound, OutcomeUnknown
from ..validation import (
    fingerprint,
    is_key,
    prefers_durable,
    read_idempotency_key,
    read_increment,
    read_increments,
)
from ..writebehind import Durable, Keyed, KeyedOutcome
from . import json_response

ACCEPTED = 202
COMMITTED = 204
#: The one scope of the open routes' idempotency keys (a session's user has a scope of its own).
OPEN_SCOPE = "open"
DURABLE_APPLIED = {"Preference-Applied": "durable"}


async def increment(request: web.Request) -> web.Response:
    """POST /increment and /api/increment: one increment."""
    idempotency_key = read_idempotency_key(request)
    key, value = await read_increment(request)
    if idempotency_key is None and "Prefer" not in request.headers:
        # The default path: summed into the replica's dict, no I/O.
        app = request.app
        app[keys.WRITE_BEHIND].add(key, value)
        app[keys.METRICS].increments.inc()
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
    app = request.app
    write_behind, metrics = app[keys.WRITE_BEHIND], app[keys.METRICS]
    durable = prefers_durable(request)
    keyed = None
    if idempotency_key is not None:
        session = request.get(keys.SESSION)
        scope = OPEN_SCOPE if session is None else f"user:{session.user_id}"
        keyed = Keyed(scope, idempotency_key, fingerprint(kind, items), tuple(items))
    if not durable:
        if keyed is None:
            write_behind.add_many(items)
            metrics.increments.inc(len(items))
            return web.Response(status=ACCEPTED)
        if write_behind.waiting_durably(keyed.ident):
            raise KeyInUse("a durable request with this key still waits for its commit")
        outcome = write_behind.add_keyed(keyed)
        if outcome is KeyedOutcome.CONFLICT:
            raise _reused()
        if outcome is KeyedOutcome.ACCEPTED:
            metrics.increments.inc(len(items))
        return web.Response(status=ACCEPTED)  # a replay gets the answer the first one got
    if keyed is not None:
        if write_behind.waiting_durably(keyed.ident):
            raise KeyInUse("a durable request with this key still waits for its commit")
        known = write_behind.aggregator.lookup(keyed.ident)
        if known is not None:
            recorded, applied = known
            if recorded != keyed.fingerprint:
                raise _reused()
            # The first request with this key is committed (a durable answer is true), or
            # is written behind (it got a 202: so does its retry).
            if applied:
                return web.Response(status=COMMITTED, headers=DURABLE_APPLIED)
            return web.Response(status=ACCEPTED)
    answer = await write_behind.commit_durably(items, keyed)
    if answer.outcome is Durable.NOT_SENT:
        raise NotCommitted(
            "the increments could not be committed in time; nothing was applied",
            headers={"Retry-After": "1"},
        )
    if answer.outcome is Durable.UNKNOWN:
        raise OutcomeUnknown(
            "no commit in time: the increments may have been applied, or may still be (the"
            " replica keeps trying); a retry with the same Idempotency-Key is safe, one"
            " without may count them twice",
            headers={"Retry-After": "1"},
        )
    if answer.outcome is Durable.CONFLICT:
        raise _reused()
    if answer.outcome is Durable.COMMITTED:
        metrics.increments.inc(sum(1 for key, _ in items if key not in answer.rejected))
    if answer.rejected:
        # Some items were not applied: never a plain 204. Which ones, by their index.
        not_applied = [
            {"index": n, "key": key, "reason": "the counter would leave the 64-bit range"}
            for n, (key, _) in enumerate(items)
            if key in answer.rejected
        ]
        return json_response({"notApplied": not_applied}, headers=DURABLE_APPLIED)
    return web.Response(status=COMMITTED, headers=DURABLE_APPLIED)


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this Idempotency-Key was used for another request; nothing was applied"
    )


async def get_counter(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if not is_key(key):  # a NUL, say: no counter can have it, and Postgres text cannot hold it
        raise NotFound("no counter has that key")
    async with db.connection(request.app[keys.PG_POOL], "counter database") as conn:
        counter = await counters.get(conn, key)
    if counter is None:
        raise NotFound("no counter with that key has been persisted")
    return json_response(counter)
