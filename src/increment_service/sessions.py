"""Sessions guard the /api surface. Users, logins and cookies arrive with issue 3; until then
no request carries a valid session, so every guarded route answers 401."""

from __future__ import annotations

from aiohttp import web

from .errors import Unauthorized


async def require_session(request: web.Request) -> None:
    raise Unauthorized("log in first: POST /api/sessions")
