"""The OpenAPI document's tokens: the bearer scheme beside the cookie one on every route that
takes both, the ``/api/tokens`` routes and their schemas, and the RFC 6750 challenges.
(openapi.py's ``document()`` is the entry point; it calls ``add_tokens``.)"""

from __future__ import annotations

from typing import Any

from .tokens import MAX_LIVE_TOKENS
from .tokens.format import PREFIX, TOKEN_CHARS
from .validation.bodies import MAX_BODY_BYTES
from .validation.tokens import MAX_EXPIRES_SECONDS, MAX_NAME_CHARS, MIN_EXPIRES_SECONDS, SCOPES

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_RETRY = {"$ref": "#/components/responses/ProblemRetryAfter"}
_UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
_FORBIDDEN = {"$ref": "#/components/responses/Forbidden"}

#: The routes that take a session or a token, and the scope a token needs there.
SCOPED = {
    ("/api/increment", "post"): "increment",
    ("/api/increments", "post"): "increment",
    ("/api/counters/{key}", "get"): "read",
    ("/api/counters", "get"): "read",
    ("/api/counters/lookup", "post"): "read",
}
#: The open routes: INCREMENT_AUTH decides (none: no credentials; session: a session or a
#: token; token: a token).
OPEN = {("/increment", "post"), ("/increments", "post")}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _session_only(summary: str, operation_id: str, **more: Any) -> dict[str, Any]:
    """An operation of /api/tokens: a session, never a token (403 token-not-allowed)."""
    responses = more.pop("responses")
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": [{"session": []}],
        **more,
        "responses": {
            **responses,
            "400": _PROBLEM,  # a token in the query string
            "401": _UNAUTHORIZED,
            "403": _FORBIDDEN,
            "503": _RETRY,
        },
    }


PATHS: dict[str, Any] = {
    "/api/tokens": {
        "post": _session_only(
            f"Make a token (shown this once); a user holds at most {MAX_LIVE_TOKENS} live ones",
            "createToken",
            requestBody={
                "required": True,
                "description": f"at most {MAX_BODY_BYTES} bytes",
                "content": _json("NewToken"),
            },
            responses={
                "201": {
                    "description": "Made: the token is in this answer and nowhere else",
                    "content": _json("CreatedToken"),
                },
                # 409 too-many-tokens: the cap on live tokens.
                **{str(code): _PROBLEM for code in (409, 413, 415, 422)},
            },
        ),
        "get": _session_only(
            "The user's tokens, without their secrets",
            "listTokens",
            responses={"200": {"description": "The tokens", "content": _json("TokenList")}},
        ),
    },
    "/api/tokens/{id}": {
        "delete": _session_only(
            "Revoke a token: refused on every replica within a second",
            "revokeToken",
            parameters=[
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            responses={
                "204": {"description": "Revoked"},
                "404": {**_PROBLEM},  # an unknown id, or another user's
            },
        ),
    },
}

_TIME = {"type": "string", "format": "date-time"}
_SCOPES = {
    "type": "array",
    "minItems": 1,
    "uniqueItems": True,
    "items": {"enum": list(SCOPES)},
}

SCHEMAS: dict[str, Any] = {
    "NewToken": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "scopes"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
            "scopes": _SCOPES,
            "expiresInSeconds": {
                "type": ["integer", "null"],
                "minimum": MIN_EXPIRES_SECONDS,
                "maximum": MAX_EXPIRES_SECONDS,
                "description": "absent or null: the token does not expire",
            },
        },
    },
    "CreatedToken": {
        "type": "object",
        "required": ["id", "name", "scopes", "token", "createdAt", "expiresAt"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "scopes": _SCOPES,
            "token": {
                "type": "string",
                "minLength": TOKEN_CHARS,
                "maxLength": TOKEN_CHARS,
                "pattern": f"^{PREFIX}[0-9A-Za-z]+$",
            },
            "createdAt": _TIME,
            "expiresAt": {**_TIME, "type": ["string", "null"]},
        },
    },
    "Token": {
        "type": "object",
        "required": ["id", "name", "scopes", "createdAt", "expiresAt", "lastUsedAt"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "scopes": _SCOPES,
            "createdAt": _TIME,
            "expiresAt": {**_TIME, "type": ["string", "null"]},
            "lastUsedAt": {
                **_TIME,
                "type": ["string", "null"],
                "description": "written in batches: up to 10 s behind the last use",
            },
        },
    },
    "TokenList": {
        "type": "object",
        "required": ["tokens"],
        "properties": {
            "tokens": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}}
        },
    },
}

_CHALLENGE = {
    "WWW-Authenticate": {
        "description": (
            'Bearer realm="increment-service" (RFC 6750 section 3), with error="invalid_token"'
            " for a malformed, unknown, expired or revoked token"
        ),
        "required": True,
        "schema": {"type": "string"},
    }
}
_PROBLEM_CONTENT = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}
RESPONSES: dict[str, Any] = {
    "Unauthorized": {
        "description": "RFC 9457 problem details, with a challenge (every 401 has one)",
        "headers": _CHALLENGE,
        "content": _PROBLEM_CONTENT,
    },
    "Forbidden": {
        "description": (
            "RFC 9457 problem details: a token without the route's scope (insufficient-scope,"
            ' with WWW-Authenticate: Bearer error="insufficient_scope"), or a token on'
            " /api/tokens (token-not-allowed)"
        ),
        "content": _PROBLEM_CONTENT,
    },
}

BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        f"An API token ({PREFIX}..., POST /api/tokens) in the Authorization header, never in"
        " the URL. Its scopes: increment (the increment routes), read (counter reads)."
    ),
}


def add_tokens(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the tokens' routes, schemes and challenges."""
    paths = document["paths"]
    for operations in paths.values():
        for operation in operations.values():
            # Operations share their answers' dict (openapi.py's _INCREMENT): changed copies.
            responses = operation["responses"] = dict(operation["responses"])
            if "401" in responses:
                responses["401"] = _UNAUTHORIZED
    for (path, method), scope in SCOPED.items():
        operation = paths[path][method]
        operation["security"] = [{"session": []}, {"bearer": [scope]}]
        # 400: a token in the query string; 403: a token without the scope.
        operation["responses"].update({"400": _PROBLEM, "403": _FORBIDDEN})
    for path, method in OPEN:
        operation = paths[path][method]
        operation["security"] = [{}, {"session": []}, {"bearer": ["increment"]}]
        operation["description"] = (
            "INCREMENT_AUTH decides: none (the default), no credentials; session, a session or"
            " a token; token, a token only."
        )
        operation["responses"].update({"403": _FORBIDDEN})
    paths.update(PATHS)
    components = document["components"]
    components["securitySchemes"]["bearer"] = BEARER
    components["responses"].update(RESPONSES)
    components["schemas"].update(SCHEMAS)
    return document
