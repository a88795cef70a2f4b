"""Request headers with a meaning here: ``Idempotency-Key`` (IETF draft
httpapi-idempotency-key-header) and ``Prefer`` (RFC 7240)."""

from __future__ import annotations

from aiohttp import web

from ..errors import InvalidIdempotencyKey

IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255


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
