"""API tokens: made, listed and revoked by a signed-in person (a session; a token gets 403)."""

from __future__ import annotations

import datetime
from typing import Any

from aiohttp import web

from .. import db
from ..appkeys import PG_POOL, TOKENS
from ..errors import NotFound, TooManyTokens, Unauthorized
from ..sessions import UNAUTHORIZED
from ..tokens import MAX_LIVE_TOKENS, NoSuchUser, TokenRow, TooMany, new_token, store
from ..tokens.format import digest
from ..validation.tokens import read_new_token, token_id
from . import json_response
from .guard import require_person

DATABASE = "token database"


def _time(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _listed(row: TokenRow) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "scopes": list(row.scopes),
        "createdAt": _time(row.created_at),
        "expiresAt": _time(row.expires_at),
        "lastUsedAt": _time(row.last_used_at),
    }


async def create_token(request: web.Request) -> web.Response:
    """POST /api/tokens: a new token, shown this once."""
    session = await require_person(request)
    name, scopes, expires_in = await read_new_token(request)
    token = new_token()
    async with db.connection(request.app[PG_POOL], DATABASE) as conn:
        try:
            row = await store.insert(
                conn, session.user_id, name, scopes, digest(token), expires_in, MAX_LIVE_TOKENS
            )
        except TooMany:
            raise TooManyTokens(
                f"a user may hold {MAX_LIVE_TOKENS} live tokens: revoke one first"
            ) from None
        except NoSuchUser:
            raise Unauthorized(UNAUTHORIZED) from None
    body = {
        "id": str(row.id),
        "name": row.name,
        "scopes": list(row.scopes),
        "token": token,
        "createdAt": _time(row.created_at),
        "expiresAt": _time(row.expires_at),
    }
    return json_response(body, 201, headers={"Cache-Control": "no-store"})


async def list_tokens(request: web.Request) -> web.Response:
    """GET /api/tokens: the user's tokens, without their secrets."""
    session = await require_person(request)
    async with db.connection(request.app[PG_POOL], DATABASE) as conn:
        rows = await store.list_of(conn, session.user_id)
    return json_response({"tokens": [_listed(row) for row in rows]})


async def revoke_token(request: web.Request) -> web.Response:
    """DELETE /api/tokens/{id}: revoked on every replica (within a second)."""
    session = await require_person(request)
    which = token_id(request)
    async with db.connection(request.app[PG_POOL], DATABASE) as conn:
        revoked = await store.revoke(conn, session.user_id, which)
    if revoked is None:
        raise NotFound("no token of yours has that id")
    request.app[TOKENS].verifier.evict(revoked)  # here at once, without waiting for the echo
    return web.Response(status=204)
