"""Validation at the edge: every request body (an increment, a new user, credentials) becomes
typed values or a problem, nothing between."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import hdrs, web

from . import emails
from .errors import (
    InvalidIdempotencyKey,
    MalformedJSON,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)

#: Bodies are tiny JSON objects; anything bigger is refused before it is parsed.
MAX_BODY_BYTES = 4096
#: A batch (POST /increments): 1 to 1000 increments in at most 128 KiB.
MAX_BATCH_ITEMS = 1000
MAX_BATCH_BODY_BYTES = 128 * 1024
MAX_IDEMPOTENCY_KEY_CHARS = 255
IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_KEY_CHARS = 256
MAX_SAFE_INTEGER = 2**53 - 1
#: bcrypt reads at most 72 bytes; longer passwords are refused, never silently truncated.
MIN_PASSWORD_BYTES, MAX_PASSWORD_BYTES = 8, 72

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
    # client_max_size (the batch limit) stops a chunked body that grows past any route's.
    body = await request.read()
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"the body may be at most {max_bytes} bytes")
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


def check_key(data: dict[str, Any], errors: list[dict[str, str]], at: str = "") -> str:
    key = data.get("key")
    if "key" not in data:
        return ""
    if not isinstance(key, str):
        errors.append({"pointer": f"{at}/key", "detail": "must be a string"})
    elif not 1 <= len(key) <= MAX_KEY_CHARS:
        errors.append(
            {"pointer": f"{at}/key", "detail": f"must be 1 to {MAX_KEY_CHARS} characters"}
        )
    elif _FORBIDDEN_IN_KEY.search(key):
        errors.append(
            {
                "pointer": f"{at}/key",
                "detail": "must not contain control characters or lone surrogates",
            }
        )
    else:
        return key
    return ""


def check_value(data: dict[str, Any], errors: list[dict[str, str]], at: str = "") -> int:
    value = data.get("value")
    if "value" not in data:
        return 0
    # bool is a subclass of int; `true` is not a number.
    if type(value) is not int:
        errors.append({"pointer": f"{at}/value", "detail": "must be an integer"})
    elif not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        errors.append(
            {"pointer": f"{at}/value", "detail": "must be between -(2^53-1) and 2^53-1 inclusive"}
        )
    else:
        return value
    return 0


def _plain_increment(data: Any) -> tuple[str, int] | None:
    """The common case in one expression; any doubt goes through the checks that name errors."""
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
    return None


def _check_increment(data: Any, errors: list[dict[str, str]], at: str = "") -> tuple[str, int]:
    if not isinstance(data, dict):
        errors.append({"pointer": at, "detail": "must be an object"})
        return "", 0
    for name in ("key", "value"):
        if name not in data:
            errors.append({"pointer": f"{at}/{name}", "detail": "is required"})
    for name in data:
        if name not in ("key", "value"):
            errors.append({"pointer": f"{at}{_pointer(name)}", "detail": "is not a known member"})
    return check_key(data, errors, at), check_value(data, errors, at)


async def read_increment(request: web.Request) -> tuple[str, int]:
    """The ``(key, value)`` of an increment body, or a problem naming every bad member."""
    data = await read_json(request)
    plain = _plain_increment(data)
    if plain is not None:
        return plain
    errors: list[dict[str, str]] = []
    data = check_object(data, ("key", "value"), errors)
    key = check_key(data, errors)
    value = check_value(data, errors)
    if errors:
        raise ValidationFailed("the increment body is invalid", errors=errors)
    return key, value


async def read_increments(request: web.Request) -> list[tuple[str, int]]:
    """A batch body ``{"increments": [{"key", "value"}, ...]}``: 1 to MAX_BATCH_ITEMS items,
    all valid or a problem pointing at every bad one (``/increments/17/value``)."""
    errors: list[dict[str, str]] = []
    data = check_object(await read_json(request, MAX_BATCH_BODY_BYTES), ("increments",), errors)
    given = data.get("increments")
    if "increments" in data and (
        not isinstance(given, list) or not 1 <= len(given) <= MAX_BATCH_ITEMS
    ):
        errors.append(
            {
                "pointer": "/increments",
                "detail": f"must be an array of 1 to {MAX_BATCH_ITEMS} increments",
            }
        )
    if errors:
        raise ValidationFailed("the batch body is invalid", errors=errors)
    assert isinstance(given, list)
    items: list[tuple[str, int]] = []
    for n, entry in enumerate(given):
        item = _plain_increment(entry) or _check_increment(entry, errors, f"/increments/{n}")
        items.append(item)
    if errors:
        raise ValidationFailed("the batch body is invalid", errors=errors)
    return items


def read_idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, or None without one.

    As the IETF draft has it, a structured-field string (``"..."``, with ``\\"`` and ``\\\\``
    escapes), or a bare token as common APIs accept; either way 1 to 255 visible ASCII
    characters (``!`` to ``~``), or a 400."""
    headers = request.headers
    if IDEMPOTENCY_KEY not in headers:
        return None
    values = headers.getall(IDEMPOTENCY_KEY)
    if len(values) != 1:
        raise InvalidIdempotencyKey("send one Idempotency-Key")
    raw = values[0].strip(" \t")
    if raw.startswith('"'):
        key = _sf_string(raw)
    elif raw and all("!" <= char <= "~" for char in raw):
        key = raw
    else:
        key = None
    if key is None or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidIdempotencyKey(
            f"the Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII"
            ' characters, bare or as a structured-field string ("...")'
        )
    return key


def _sf_string(raw: str) -> str | None:
    """The content of an RFC 8941 string (``"a\\"b"``), or None if ``raw`` is not exactly one
    (or holds a character that is not visible ASCII)."""
    chars: list[str] = []
    at = 1
    while at < len(raw):
        char = raw[at]
        if char == "\\":
            if raw[at + 1 : at + 2] not in ('"', "\\"):
                return None
            chars.append(raw[at + 1])
            at += 2
        elif char == '"':
            return "".join(chars) if at == len(raw) - 1 else None
        elif "!" <= char <= "~":
            chars.append(char)
            at += 1
        else:
            return None
    return None  # no closing quote


def prefers_durable(request: web.Request) -> bool:
    """Whether the request asks ``Prefer: durable`` (RFC 7240: a list of preferences, each a
    token, case-insensitive, maybe with a value and parameters; unknown ones are ignored)."""
    for value in request.headers.getall("Prefer", ()):
        for preference in value.split(","):
            name = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if name == "durable":
                return True
    return False


def fingerprint(kind: str, items: Sequence[tuple[str, int]]) -> bytes:
    """What a keyed request must repeat to be the same request: the route kind (a single
    increment or a batch) and the parsed items, in order (not the headers, not the bytes)."""
    return hashlib.blake2b(orjson.dumps([kind, items]), digest_size=16).digest()


# --- users and credentials ----------------------------------------------------------------


def password_bytes(password: str) -> bytes | None:
    """The UTF-8 bytes bcrypt sees, or None if the text cannot be encoded (lone surrogates)."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


def check_email(data: dict[str, Any], errors: list[dict[str, str]]) -> tuple[str, str]:
    """The email as given and its key (emails.email_key)."""
    email = data.get("email")
    if "email" not in data:
        return "", ""
    if not isinstance(email, str):
        errors.append({"pointer": "/email", "detail": "must be a string"})
        return "", ""
    try:
        return email, emails.email_key(email)
    except emails.InvalidEmail as exc:
        errors.append({"pointer": "/email", "detail": str(exc)})
        return "", ""


def check_password(data: dict[str, Any], errors: list[dict[str, str]]) -> bytes:
    password = data.get("password")
    if "password" not in data:
        return b""
    if not isinstance(password, str):
        errors.append({"pointer": "/password", "detail": "must be a string"})
        return b""
    encoded = password_bytes(password)
    if encoded is None:
        errors.append({"pointer": "/password", "detail": "must be valid Unicode"})
    elif not MIN_PASSWORD_BYTES <= len(encoded) <= MAX_PASSWORD_BYTES:
        errors.append(
            {
                "pointer": "/password",
                "detail": f"must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes in UTF-8",
            }
        )
    else:
        return encoded
    return b""


async def read_new_user(request: web.Request) -> tuple[str, str, bytes]:
    """Email, email key and password bytes of a valid body; ValidationFailed otherwise."""
    errors: list[dict[str, str]] = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    email, email_key = check_email(data, errors)
    password = check_password(data, errors)
    if errors:
        raise ValidationFailed("the user body is invalid", errors=errors)
    return email, email_key, password


async def read_credentials(request: web.Request) -> tuple[str | None, bytes | None]:
    """The email key and password bytes of a login body. Either is None when it could never
    match (an email no account may have, a password bcrypt never took): the login still runs
    its one bcrypt check, so such credentials look like any wrong ones, never like a 422."""
    errors: list[dict[str, str]] = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    for name in ("email", "password"):
        if name in data and not isinstance(data[name], str):
            errors.append({"pointer": f"/{name}", "detail": "must be a string"})
    if errors:
        raise ValidationFailed("the login body is invalid", errors=errors)
    try:
        email_key: str | None = emails.email_key(data["email"][: emails.MAX_EMAIL_CHARS + 1])
    except emails.InvalidEmail:
        email_key = None
    password = password_bytes(data["password"])
    if password is not None and len(password) > MAX_PASSWORD_BYTES:
        password = None
    return email_key, password
