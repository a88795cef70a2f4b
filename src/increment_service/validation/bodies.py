"""Request bodies: their size, their content coding, their media type, strict JSON, and the
shape of an object (every member named in a problem's ``errors`` by its JSON pointer)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import hdrs, web

from ..errors import MalformedJSON, PayloadTooLarge, UnsupportedMediaType, ValidationFailed

#: Bodies are tiny JSON objects; anything bigger is refused before it is parsed.
MAX_BODY_BYTES = 4096

#: What a problem's ``errors`` holds: a JSON pointer (RFC 6901) and what is wrong there.
Errors = list[dict[str, str]]


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


async def read_json(request: web.Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    # The usual header as it is sent skips parsing it (aiohttp parses it on first use).
    if request.headers.get(hdrs.CONTENT_TYPE) != "application/json":
        if request.content_type != "application/json":
            raise UnsupportedMediaType("send the body as Content-Type: application/json")
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("JSON bodies must be UTF-8")
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"the body may be at most {max_bytes} bytes")
    # With a Content-Length (within the limit) aiohttp reads exactly that many bytes.
    body = await (request.read() if length is not None else _read_growing(request, max_bytes))
    return parse_json(body)


async def _read_growing(request: web.Request, max_bytes: int) -> bytes:
    """A body without a Content-Length (chunked), refused as soon as it grows past this
    route's limit: ``request.read()`` would take it up to the app's client_max_size, the
    largest route's (a lookup's 1 MiB), before a 4 KiB route could refuse it."""
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"the body may be at most {max_bytes} bytes")
    return bytes(body)


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


def pointer(name: str, at: str = "") -> str:
    """The JSON pointer of member ``name`` of the object at ``at``."""
    return at + "/" + name.replace("~", "~0").replace("/", "~1")


def require_object(data: Any) -> dict[str, Any]:
    """The body must be an object (else nothing more can be said of it)."""
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the body must be a JSON object",
            errors=[{"pointer": "", "detail": "must be an object"}],
        )
    return data


def check_object(data: Any, required: tuple[str, ...], errors: Errors) -> dict[str, Any]:
    """The body must be an object with exactly the ``required`` members."""
    obj = require_object(data)
    check_members(obj, required, errors)
    return obj


def check_members(
    data: dict[str, Any], required: tuple[str, ...], errors: Errors, at: str = ""
) -> None:
    """Every ``required`` member present, and no other."""
    for name in required:
        if name not in data:
            errors.append({"pointer": pointer(name, at), "detail": "is required"})
    for name in data:
        if name not in required:
            errors.append({"pointer": pointer(name, at), "detail": "is not a known member"})
