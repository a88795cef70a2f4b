"""Tokens at the edge: the body of a new token, the bearer credentials of a request (RFC 6750
section 2.1: the ``Authorization`` header, and nowhere else) and a token id in a path."""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from ..errors import InvalidToken, NotFound, TokenInQuery, ValidationFailed
from .bodies import Errors, check_members, read_json, require_object

SCOPES = ("increment", "read")
MAX_NAME_CHARS = 100
MIN_EXPIRES_SECONDS, MAX_EXPIRES_SECONDS = 60, 31_536_000  # a minute to a year

# Control characters (C0, DEL, C1) and lone surrogates: a name is shown back as it is.
_FORBIDDEN_IN_NAME = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SCHEME = "bearer"
#: RFC 6750 section 2.1's b64token (the service's own tokens are a subset).
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return "must be a string"
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    if _FORBIDDEN_IN_NAME.search(name):
        return "must not contain control characters or lone surrogates"
    return None


def _scopes_problem(scopes: Any) -> str | None:
    if not isinstance(scopes, list) or not scopes:
        return f"must be a non-empty list of {', '.join(SCOPES)}"
    if not all(isinstance(scope, str) and scope in SCOPES for scope in scopes):
        return f"each scope must be one of {', '.join(SCOPES)}"
    if len(set(scopes)) != len(scopes):
        return "must not name a scope twice"
    return None


def _expires_problem(expires: Any) -> str | None:
    if type(expires) is not int:  # not a bool, not 60.0
        return "must be an integer (seconds)"
    if not MIN_EXPIRES_SECONDS <= expires <= MAX_EXPIRES_SECONDS:
        return f"must be between {MIN_EXPIRES_SECONDS} and {MAX_EXPIRES_SECONDS} seconds"
    return None


async def read_new_token(request: web.Request) -> tuple[str, tuple[str, ...], int | None]:
    """Name, scopes (in the order of SCOPES) and lifetime in seconds (None: no expiry) of a
    valid body; ValidationFailed otherwise."""
    data = require_object(await read_json(request))
    errors: Errors = []
    optional = "expiresInSeconds"
    check_members(
        {name: value for name, value in data.items() if name != optional},
        ("name", "scopes"),
        errors,
    )
    checks = [
        ("name", _name_problem),
        ("scopes", _scopes_problem),
        (optional, _expires_problem),
    ]
    for name, problem_of in checks:
        if name in data and (name != optional or data[name] is not None):
            problem = problem_of(data[name])
            if problem is not None:
                errors.append({"pointer": f"/{name}", "detail": problem})
    if errors:
        raise ValidationFailed("the token body is invalid", errors=errors)
    scopes = tuple(scope for scope in SCOPES if scope in data["scopes"])
    return data["name"], scopes, data.get(optional)


def bearer(request: web.Request) -> str | None:
    """The request's bearer token, None without one (no ``Authorization``, or another
    scheme). A token in the query string is refused (400), never looked at; a ``Bearer``
    without a well-shaped token is an invalid token (401)."""
    if "access_token" in request.query_string and "access_token" in request.query:
        raise TokenInQuery()
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != _SCHEME:
        return None
    token = token.strip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidToken("the Authorization header holds no bearer token")
    return token


def token_id(request: web.Request) -> uuid.UUID:
    """The token id of the path; no token has an id that is not a UUID (404)."""
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("no token of yours has that id") from None
