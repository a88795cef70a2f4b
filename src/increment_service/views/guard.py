"""The session guard of the ``/api`` routes (and of the open ones with INCREMENT_AUTH=session)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from ..appkeys import SESSION, SESSIONS
from ..errors import Unauthorized
from ..sessions import UNAUTHORIZED, SessionInfo


async def require_session(request: web.Request) -> SessionInfo:
    """The request's live session, or 401 (503 if Redis cannot say)."""
    session = await request.app[SESSIONS].load(request)
    if session is None:
        raise Unauthorized(UNAUTHORIZED)
    return session


def guarded(handler: Handler) -> Handler:
    """The session guard in front of ``handler``: 401 without a live session."""

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        request[SESSION] = await require_session(request)
        return await handler(request)

    return guarded_handler
