"""Validation at the edge: request bodies become typed values or a problem, nothing between."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from aiohttp import hdrs, web

from .errors import MalformedJSON, PayloadTooLarge, UnsupportedMediaType, ValidationFailed

#: Bodies are tiny JSON objects; anything bigger is refused before it is parsed.
MAX_BODY_BYTES = 4096
MAX_KEY_CHARS = 256
MAX_SAFE_INTEGER = 2**53 - 1

# Control characters (C0, DEL, C1) and lone surrogates, which UTF-8 cannot carry to Postgres.
_FORBIDDEN_IN_KEY = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        names = [name for name, _ in pairs]
        duplicate = next(name for name in names if names.count(name) > 1)
        raise _DuplicateMember(f"duplicate member name {duplicate!r}")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every request: json.loads with these options builds a new one per call,
# which cost about as much as the parse itself (cProfile under wrk).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_reject_constant)


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate member names at any depth.

    orjson parses a plain body several times faster than the standard library, and refuses
    what the rules refuse, except duplicate member names, which it accepts silently (the last
    one wins). So its result is taken only when no member can have gone missing: no backslash
    in the body (every quote then delimits a string), an object whose values are scalars, and
    exactly as many quotes as its names and string values account for. Anything else, and
    every error, goes to the strict parser, which says what is wrong."""
    if b"\\" not in body:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if _nothing_dropped(data, body):
                return data
    return parse_json_strict(body)


def _nothing_dropped(data: Any, body: bytes) -> bool:
    kind = type(data)
    if kind is dict:
        quotes = 2 * len(data)
        for value in data.values():
            if type(value) is str:
                quotes += 2
            elif type(value) is dict or type(value) is list:
                return False  # nested members: the strict parser looks at every depth
        return body.count(b'"') == quotes
    return kind is not list  # a list may hold objects; a scalar has no members


def parse_json_strict(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
        return _DECODER.decode(text)
    except _DuplicateMember as exc:
        raise MalformedJSON(f"the body has a {exc}") from None
    except UnicodeDecodeError:
        raise MalformedJSON("the body is not valid UTF-8") from None
    except RecursionError:
        raise MalformedJSON("the body is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError and the constants above
        raise MalformedJSON(f"the body is not valid JSON: {exc}") from None


async def read_json(request: web.Request) -> Any:
    # The usual header as it is sent skips parsing it (aiohttp parses it on first use).
    if request.headers.get(hdrs.CONTENT_TYPE) != "application/json":
        if request.content_type != "application/json":
            raise UnsupportedMediaType("send the body as Content-Type: application/json")
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("JSON bodies must be UTF-8")
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body may be at most {MAX_BODY_BYTES} bytes")
    # client_max_size (set to MAX_BODY_BYTES) also stops a chunked body that grows too big.
    body = await request.read()
    return parse_json(body)


def refuse_content_coding(request: web.Request) -> None:
    """Bodies are tiny: none may come compressed (RFC 7694: 415 with ``Accept-Encoding``).

    The server runs with aiohttp's ``auto_decompress`` off (app.py), so nothing is ever
    inflated, whatever this answers: with it on, aiohttp inflates a body as it arrives and
    keeps reading (and inflating) the rest after the answer, and a 2 MB gzip bomb costs the
    event loop seconds before any handler runs.
    """
    headers = request.headers
    if hdrs.CONTENT_ENCODING not in headers:
        return
    for value in headers.getall(hdrs.CONTENT_ENCODING):
        for coding in value.split(","):
            coding = coding.strip().lower()
            if coding and coding != "identity":
                raise UnsupportedMediaType(
                    "request bodies must not be compressed: send them without Content-Encoding",
                    headers={"Accept-Encoding": "identity"},
                )


def is_key(key: str) -> bool:
    """Whether ``key`` could name a counter (the rules of an increment's ``key``)."""
    return 1 <= len(key) <= MAX_KEY_CHARS and not _FORBIDDEN_IN_KEY.search(key)


def _pointer(name: str) -> str:
    return "/" + name.replace("~", "~0").replace("/", "~1")


def check_object(
    data: Any, required: tuple[str, ...], errors: list[dict[str, str]]
) -> dict[str, Any]:
    """The body must be an object with exactly the ``required`` members."""
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the body must be a JSON object",
            errors=[{"pointer": "", "detail": "must be an object"}],
        )
    for name in required:
        if name not in data:
            errors.append({"pointer": _pointer(name), "detail": "is required"})
    for name in data:
        if name not in required:
            errors.append({"pointer": _pointer(name), "detail": "is not a known member"})
    return data


def check_key(data: dict[str, Any], errors: list[dict[str, str]]) -> str:
    key = data.get("key")
    if "key" not in data:
        return ""
    if not isinstance(key, str):
        errors.append({"pointer": "/key", "detail": "must be a string"})
    elif not 1 <= len(key) <= MAX_KEY_CHARS:
        errors.append({"pointer": "/key", "detail": f"must be 1 to {MAX_KEY_CHARS} characters"})
    elif _FORBIDDEN_IN_KEY.search(key):
        errors.append(
            {"pointer": "/key", "detail": "must not contain control characters or lone surrogates"}
        )
    else:
        return key
    return ""


def check_value(data: dict[str, Any], errors: list[dict[str, str]]) -> int:
    value = data.get("value")
    if "value" not in data:
        return 0
    # bool is a subclass of int; `true` is not a number.
    if type(value) is not int:
        errors.append({"pointer": "/value", "detail": "must be an integer"})
    elif not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        errors.append(
            {"pointer": "/value", "detail": "must be between -(2^53-1) and 2^53-1 inclusive"}
        )
    else:
        return value
    return 0


async def read_increment(request: web.Request) -> tuple[str, int]:
    """The ``(key, value)`` of an increment body, or a problem naming every bad member."""
    data = await read_json(request)
    # The common case in one expression; any doubt goes through the checks that name errors.
    if type(data) is dict and len(data) == 2:
        key, value = data.get("key"), data.get("value")
        if (
            type(key) is str
            and type(value) is int
            and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
            and 1 <= len(key) <= MAX_KEY_CHARS
            and not _FORBIDDEN_IN_KEY.search(key)
        ):
            return key, value
    errors: list[dict[str, str]] = []
    data = check_object(data, ("key", "value"), errors)
    key = check_key(data, errors)
    value = check_value(data, errors)
    if errors:
        raise ValidationFailed("the increment body is invalid", errors=errors)
    return key, value
