"""The guard of the routes that need a caller: a session (cookie) or a bearer token.

A route declares what it takes: ``guarded(handler, scope="increment")`` or
``guarded(handler, scope="read")`` takes a session or a token with that scope (a token, when
both come, decides); ``session=False`` takes a token only (INCREMENT_AUTH=token);
``guarded(handler)`` (no scope) takes a session only. The refusals are RFC 6750's: 401 with a
challenge (``WWW-Authenticate``) without credentials or with a bad token, 403
``insufficient_scope`` for a token without the scope.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from ..appkeys import SESSION, SESSIONS, TOKENS, USER_ID
from ..errors import InsufficientScope, InvalidToken, TokenInQuery, TokenNotAllowed, Unauthorized
from ..sessions import UNAUTHORIZED, SessionInfo
from ..validation.tokens import bearer

#: A token-only route without a token.
TOKEN_REQUIRED = "send a token: Authorization: Bearer <token> (POST /api/tokens makes one)"  # noqa: S105 -- a message, not a secret


async def require_session(request: web.Request) -> SessionInfo:
    """The request's live session, or 401 (503 if Redis cannot say)."""
    session = await request.app[SESSIONS].load(request)
    if session is None:
        raise Unauthorized(UNAUTHORIZED)
    return session


async def require_person(request: web.Request) -> SessionInfo:
    """A session, and no token: what manages tokens (a token gets 403)."""
    if _bearer(request) is not None:
        raise TokenNotAllowed("tokens are managed with a session (log in), not with a token")
    return await require_session(request)


def _bearer(request: web.Request) -> str | None:
    try:
        return bearer(request)
    except TokenInQuery:
        request.app[TOKENS].verifier.count_refusal("query")
        raise
    except InvalidToken:
        request.app[TOKENS].verifier.count_refusal("malformed")
        raise


def guarded(handler: Handler, scope: str | None = None, *, session: bool = True) -> Handler:
    """``handler`` behind the guard: see the module's docstring."""

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        token = _bearer(request) if scope is not None else None
        if token is not None:
            assert scope is not None  # a token is only read on a route with a scope
            verifier = request.app[TOKENS].verifier
            grant = await verifier.check(token)
            if scope not in grant.scopes:
                verifier.count_refusal("scope")
                raise InsufficientScope(scope)
            request[USER_ID] = grant.user_id
            return await handler(request)
        if not session:
            raise Unauthorized(TOKEN_REQUIRED)
        info = request[SESSION] = await require_session(request)
        request[USER_ID] = info.user_id
        return await handler(request)

    return guarded_handler
