"""The OpenAPI paths and schemas of the counter reads beyond one key (views/reads.py), merged
into the document by openapi.py."""

from __future__ import annotations

from typing import Any

from .validation.increments import MAX_KEY_CHARS
from .validation.reads import (
    DEFAULT_PAGE_LIMIT,
    MAX_LOOKUP_BODY_BYTES,
    MAX_LOOKUP_KEYS,
    MAX_PAGE_LIMIT,
)

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_PROBLEM_RETRY_AFTER = {"$ref": "#/components/responses/ProblemRetryAfter"}
_SESSION: list[dict[str, list[str]]] = [{"session": []}]
_LAG = (
    " Persisted values: an increment shows once its replica has flushed it (within the flush"
    " interval), or at once if it was durable. Counters are global: any reader reads every one."
)


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


PATHS: dict[str, Any] = {
    "/api/counters": {
        "get": {
            "operationId": "listCounters",
            "summary": "A page of the counters whose key starts with a prefix, in byte order",
            "description": (
                "Keys in the byte order of their UTF-8 (code point order), from the key after"
                " `after`. Follow `next` (as `after`) until it is null." + _LAG
            ),
            "security": _SESSION,
            "parameters": [
                _query(
                    "prefix",
                    "the keys' first characters, compared as they are (`%`, `_` and `\\` are"
                    " plain characters; send `+` as `%2B`); empty or absent: every counter",
                    {"type": "string", "maxLength": MAX_KEY_CHARS, "default": ""},
                ),
                _query(
                    "after",
                    "the last key of the previous page (its `next`): this page starts after it;"
                    " empty or absent: the first page",
                    {"type": "string", "maxLength": MAX_KEY_CHARS},
                ),
                _query(
                    "limit",
                    "the most counters a page holds",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE_LIMIT,
                        "default": DEFAULT_PAGE_LIMIT,
                    },
                ),
            ],
            "responses": {
                "200": {"description": "A page", "content": _json("CounterPage")},
                # 422: a bad, repeated or unknown parameter (errors point at /name).
                "401": _PROBLEM,
                "422": _PROBLEM,
                "503": _PROBLEM_RETRY_AFTER,
            },
        }
    },
    "/api/counters/lookup": {
        "post": {
            "operationId": "lookupCounters",
            "summary": f"The counters of 1 to {MAX_LOOKUP_KEYS} keys, and the keys not persisted",
            "description": "Each key is answered once, however often it is sent." + _LAG,
            "security": _SESSION,
            "requestBody": {
                "required": True,
                "description": f"at most {MAX_LOOKUP_BODY_BYTES} bytes",
                "content": _json("CounterLookup"),
            },
            "responses": {
                "200": {
                    "description": "Found and missing",
                    "content": _json("CounterLookupResult"),
                },
                **{str(code): _PROBLEM for code in (400, 401, 413, 415, 422)},
                "503": _PROBLEM_RETRY_AFTER,
            },
        }
    },
}

_COUNTERS = {"type": "array", "items": {"$ref": "#/components/schemas/Counter"}}

SCHEMAS: dict[str, Any] = {
    "CounterLookup": {
        "type": "object",
        "additionalProperties": False,
        "required": ["keys"],
        "properties": {
            "keys": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_LOOKUP_KEYS,
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                "description": "keys may repeat: each is answered once",
            }
        },
    },
    "CounterLookupResult": {
        "type": "object",
        "required": ["counters", "missing"],
        "properties": {
            "counters": {
                **_COUNTERS,
                "description": "the keys persisted, in the order of their first mention",
            },
            "missing": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the keys never persisted, in the order of their first mention",
            },
        },
    },
    "CounterPage": {
        "type": "object",
        "required": ["counters", "next"],
        "properties": {
            "counters": {**_COUNTERS, "description": "in byte order"},
            "next": {
                "type": ["string", "null"],
                "description": "the last key of this page, to send as `after`; null at the end",
            },
        },
    },
}
