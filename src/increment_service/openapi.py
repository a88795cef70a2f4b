"""The OpenAPI 3.1 document of the HTTP API (a test keeps it equal to the routes)."""

from __future__ import annotations

from typing import Any

from . import __version__, openapi_reads
from .emails import MAX_EMAIL_CHARS
from .openapi_tokens import add_tokens
from .sessions import COOKIE_NAME
from .validation.accounts import MAX_PASSWORD_BYTES, MIN_PASSWORD_BYTES
from .validation.bodies import MAX_BODY_BYTES
from .validation.headers import IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_CHARS
from .validation.increments import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    MAX_KEY_CHARS,
    MAX_SAFE_INTEGER,
)

_PROBLEM = {"$ref": "#/components/responses/Problem"}
# A problem that says when to retry: every 503, the 409 of an increment route, the 429.
_PROBLEM_RETRY_AFTER = {"$ref": "#/components/responses/ProblemRetryAfter"}


def _problems(*codes: int) -> dict[str, Any]:
    return {str(code): _PROBLEM for code in codes}


def _retry_after(*codes: int) -> dict[str, Any]:
    return {str(code): _PROBLEM_RETRY_AFTER for code in codes}


def _json(schema_ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


_IDEMPOTENCY_KEY = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": False,
    "description": (
        "Applies the request at most once per key (per user on the session routes, one shared"
        " scope on the open ones) while its record is live (IDEMPOTENCY_TTL_SECONDS): a retry"
        " is told what the first request was told (a durable retry, what was committed: 204, or"
        " 200 with the same notApplied) and is not applied again. Another body under the key:"
        " 422 when its owner is known, 409 with Retry-After while it is undecided, else 202 and"
        " dropped at flush. The key is 1 to"
        f" {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters, sent as an RFC 8941"
        ' structured-field string (`"abc"`), which may carry parameters (`"abc";p=1`: parsed'
        " and ignored, a malformed one is 400), or as a bare token, taken whole (a `;` in it"
        " is part of the key)."
    ),
    "schema": {"type": "string", "minLength": 1, "examples": ['"abc"', '"abc";p=1', "abc"]},
}


_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": (
        "`durable` (RFC 7240): answer only after the Postgres commit that holds the"
        " increments (204, or 200 naming the items not applied), instead of 202 at once."
        " With `durable`, `return=representation` answers 200 with each counter's running"
        " total right after this request in its commit (ignored without `durable`)."
    ),
    "schema": {"type": "string", "examples": ["durable", "durable, return=representation"]},
}
_DURABLE_APPLIED = {
    "Preference-Applied": {
        "description": "`durable`; with the totals, also `return=representation`",
        "schema": {"type": "string", "enum": ["durable", "durable, return=representation"]},
    }
}


def _increment(summary: str, body: str, limit: int) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [_IDEMPOTENCY_KEY, _PREFER],
        "requestBody": {
            "required": True,
            "description": f"at most {limit} bytes",
            "content": _json(body),
        },
        "responses": {
            "202": {"description": "Accepted (in memory); persisted within 10 s"},
            "204": {
                "description": "Prefer: durable: committed to Postgres",
                "headers": _DURABLE_APPLIED,
            },
            "200": {
                "description": (
                    "Prefer: durable (or a retry of a request so answered): committed, but some"
                    " items were not applied (their counter would have left the 64-bit range,"
                    " decided per request as if it had committed alone)"
                ),
                "headers": _DURABLE_APPLIED,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/NotApplied"},
                                {"$ref": "#/components/schemas/Representation"},
                            ]
                        }
                    }
                },
            },
            **_problems(400, 401, 405, 413, 415, 422),
            # 409: the owner of this Idempotency-Key is not decided yet (a durable request with
            # it waits for its commit, or another body waits for this replica's next flush).
            # 503: backpressure, Redis down (a session route), or (durable) not committed in
            # time, or outcome unknown. Both with Retry-After.
            **_retry_after(409, 503),
        },
    }


_INCREMENT = _increment("Add value to the counter of key", "Increment", MAX_BODY_BYTES)
_INCREMENTS = _increment(
    f"Add 1 to {MAX_BATCH_ITEMS} increments, all or none", "Increments", MAX_BATCH_BODY_BYTES
)

_HEALTH = {
    "summary": "Readiness: Postgres, Redis and the write-behind",
    "responses": {
        "200": {"description": "Ready", "content": _json("Health")},
        "503": {"description": "Not ready", "content": _json("Health")},
    },
}


def document() -> dict[str, Any]:
    """The document; openapi_tokens.py adds the tokens' routes and schemes."""
    return add_tokens(_document())


def _document() -> dict[str, Any]:
    session: list[dict[str, list[str]]] = [{"session": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "increment-service", "version": __version__},
        "paths": {
            "/increment": {"post": {**_INCREMENT, "operationId": "increment"}},
            "/api/increment": {
                "post": {**_INCREMENT, "operationId": "apiIncrement", "security": session}
            },
            "/increments": {"post": {**_INCREMENTS, "operationId": "increments"}},
            "/api/increments": {
                "post": {**_INCREMENTS, "operationId": "apiIncrements", "security": session}
            },
            "/api/counters/{key}": {
                "get": {
                    "operationId": "getCounter",
                    "summary": "The persisted value of a counter",
                    "security": session,
                    "parameters": [
                        {
                            "name": "key",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "The counter", "content": _json("Counter")},
                        **_problems(401, 404),
                        **_retry_after(503),
                    },
                }
            },
            "/api/users": {
                "post": {
                    "operationId": "createUser",
                    "summary": "Create a user (email unique in its normal form: NFKC, case-folded)",
                    "requestBody": {"required": True, "content": _json("NewUser")},
                    "responses": {
                        "201": {"description": "Created", "content": _json("User")},
                        # 429: too many account creations from one address.
                        **_problems(400, 409, 413, 415, 422),
                        **_retry_after(429, 503),
                    },
                }
            },
            "/api/sessions": {
                "post": {
                    "operationId": "login",
                    "summary": "Log in: a new session, its id in the cookie",
                    "requestBody": {"required": True, "content": _json("Credentials")},
                    "responses": {
                        "201": {
                            "description": "Logged in",
                            "headers": {
                                "Set-Cookie": {
                                    "description": f"{COOKIE_NAME}=<session id>; HttpOnly; "
                                    "Path=/; SameSite=Lax (and Secure when COOKIE_SECURE)",
                                    "schema": {"type": "string"},
                                }
                            },
                            "content": _json("SessionUser"),
                        },
                        # 401 is the same for an unknown email and a wrong password.
                        **_problems(400, 401, 413, 415, 422),
                        **_retry_after(429, 503),
                    },
                },
                "get": {
                    "operationId": "getSession",
                    "summary": "The user of the current session",
                    "security": session,
                    "responses": {
                        "200": {"description": "Logged in", "content": _json("SessionUser")},
                        **_problems(401),
                        **_retry_after(503),
                    },
                },
                "delete": {
                    "operationId": "logout",
                    "summary": "Log out: delete the session on every replica (idempotent)",
                    "responses": {
                        "204": {"description": "No session any more; the cookie is cleared"},
                        **_retry_after(503),
                    },
                },
            },
            "/api/health": {"get": {**_HEALTH, "operationId": "apiHealth"}},
            "/health": {"get": {**_HEALTH, "operationId": "health"}},
            "/livez": {
                "get": {
                    "operationId": "livez",
                    "summary": "Liveness: the process answers (no dependency checks)",
                    "responses": {"200": {"description": "Alive"}},
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1 document"}},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus exposition",
                    "responses": {"200": {"description": "Prometheus text format"}},
                }
            },
            **openapi_reads.PATHS,
        },
        "components": {
            "securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": COOKIE_NAME}},
            "responses": {
                "Problem": {
                    "description": "RFC 9457 problem details",
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                },
                "ProblemRetryAfter": {
                    "description": (
                        "RFC 9457 problem details; retry after the seconds Retry-After says"
                        " (with the same Idempotency-Key on an increment route)"
                    ),
                    "headers": {
                        "Retry-After": {
                            "description": "delay-seconds (RFC 9110 section 10.2.3)",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0},
                        }
                    },
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                },
            },
            "schemas": {
                "Increment": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["key", "value"],
                    "properties": {
                        "key": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                        "value": {
                            "type": "integer",
                            "minimum": -MAX_SAFE_INTEGER,
                            "maximum": MAX_SAFE_INTEGER,
                        },
                    },
                },
                "Increments": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["increments"],
                    "properties": {
                        "increments": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_ITEMS,
                            "items": {"$ref": "#/components/schemas/Increment"},
                            "description": "keys may repeat: their values are summed",
                        }
                    },
                },
                "NotApplied": {
                    "type": "object",
                    "required": ["notApplied"],
                    "properties": {"notApplied": {"$ref": "#/components/schemas/NotAppliedItems"}},
                },
                "NotAppliedItems": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "key", "reason"],
                        "properties": {
                            "index": {"type": "integer", "minimum": 0},
                            "key": {"type": "string"},
                            "reason": {"type": "string"},
                        },
                    },
                },
                "Representation": {
                    "description": (
                        "Prefer: durable, return=representation: each counter the request"
                        " changed (in the order its items first name them), its total right"
                        " after the request in its commit; the items not applied, if any"
                    ),
                    "type": "object",
                    "required": ["counters", "notApplied"],
                    "properties": {
                        "counters": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Counter"},
                        },
                        "notApplied": {
                            "$ref": "#/components/schemas/NotApplied/properties/notApplied"
                        },
                    },
                },
                "Counter": {
                    "type": "object",
                    "required": ["key", "value", "updatedAt"],
                    "properties": {
                        "key": {"type": "string"},
                        "value": {"type": "integer"},
                        "updatedAt": {"type": "string", "format": "date-time"},
                    },
                },
                **openapi_reads.SCHEMAS,
                "NewUser": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["email", "password"],
                    "properties": {
                        "email": {
                            "type": "string",
                            "format": "email",
                            "maxLength": MAX_EMAIL_CHARS,
                            "description": "no spaces, control, format, invisible, private-use "
                            "or unassigned characters, before or after NFKC and case folding",
                        },
                        "password": {
                            "type": "string",
                            # JSON Schema counts characters, the rule counts UTF-8 bytes (up to
                            # 4 a character): the fewest characters the rule lets through.
                            "minLength": MIN_PASSWORD_BYTES // 4,
                            "description": (
                                f"{MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes in UTF-8"
                            ),
                        },
                    },
                },
                "User": {
                    "type": "object",
                    "required": ["id", "email"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "email": {"type": "string"},
                    },
                },
                "Credentials": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["email", "password"],
                    "properties": {"email": {"type": "string"}, "password": {"type": "string"}},
                },
                "SessionUser": {
                    "type": "object",
                    "required": ["userId"],
                    "properties": {"userId": {"type": "string", "format": "uuid"}},
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "checks"],
                    "properties": {
                        "status": {"enum": ["ok", "fail"]},
                        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["pointer", "detail"],
                                "properties": {
                                    "pointer": {"type": "string"},
                                    "detail": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    }
