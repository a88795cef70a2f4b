"""Request headers with a meaning here: ``Idempotency-Key`` (IETF draft
httpapi-idempotency-key-header) and ``Prefer`` (RFC 7240)."""

from __future__ import annotations

import binascii
import string

from aiohttp import web

from ..errors import InvalidIdempotencyKey

IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255

_KEY_RULE = (
    f"the Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters,"
    ' bare or as a structured-field string ("...") with optional parameters (;name=value)'
)


def read_idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, or None without one (see ``idempotency_key``)."""
    headers = request.headers
    if IDEMPOTENCY_KEY not in headers:
        return None
    values = headers.getall(IDEMPOTENCY_KEY)
    if len(values) != 1:
        raise InvalidIdempotencyKey("send one Idempotency-Key")
    return idempotency_key(values[0])


def idempotency_key(value: str) -> str:
    """The key an ``Idempotency-Key`` field value names, or ``InvalidIdempotencyKey`` (400).

    As the IETF draft has it, an RFC 8941 item whose bare item is a string (``"..."``, with
    ``\\"`` and ``\\\\`` escapes), maybe with parameters (``"abc";p=1;q``), which are parsed
    by RFC 8941's algorithm and ignored; or, as common APIs accept, a bare token taken whole (a
    ``;`` in it is part of the key). Either way the key is 1 to 255 visible ASCII characters
    (``!`` to ``~``)."""
    raw = value.strip(" \t")  # the field's surrounding whitespace is not part of its value
    if raw.startswith('"'):
        try:
            key, at = _string(raw, 0)
            at = _parameters(raw, at)
        except _Malformed as exc:
            raise InvalidIdempotencyKey(f"{_KEY_RULE}: {exc}") from None
        if at != len(raw):
            raise InvalidIdempotencyKey(
                f"{_KEY_RULE}: {raw[at]!r} cannot follow the string or a parameter"
            )
    elif raw and all("!" <= char <= "~" for char in raw):
        key = raw
    else:
        raise InvalidIdempotencyKey(_KEY_RULE)
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all("!" <= c <= "~" for c in key):
        raise InvalidIdempotencyKey(_KEY_RULE)
    return key


# --- RFC 8941 (Structured Field Values), section 4.2: the parts of an item ------------------
# Each function parses what starts at ``text[at]`` and returns (what it read and) the position
# after it, or raises _Malformed: the algorithms of the RFC, step by step, on an index.

_LCALPHA = frozenset(string.ascii_lowercase)
_ALPHA = frozenset(string.ascii_letters)
_DIGIT = frozenset(string.digits)
_KEY_FIRST = _LCALPHA | {"*"}
_KEY_CHARS = _LCALPHA | _DIGIT | frozenset("_-.*")
_TCHAR = _ALPHA | _DIGIT | frozenset("!#$%&'*+-.^_`|~")
_TOKEN_CHARS = _TCHAR | frozenset(":/")
_BASE64 = _ALPHA | _DIGIT | frozenset("+/=")


class _Malformed(Exception):
    """Not what RFC 8941 allows; the message says where."""


def _string(text: str, at: int) -> tuple[str, int]:
    """Section 4.2.5, Parsing a String: ``"``, then printable ASCII (space included) with
    ``\\"`` and ``\\\\`` escapes, then ``"``."""
    if text[at : at + 1] != '"':
        raise _Malformed("a string must start with '\"'")
    chars: list[str] = []
    at += 1
    while at < len(text):
        char = text[at]
        at += 1
        if char == "\\":
            escaped = text[at : at + 1]
            if escaped not in ('"', "\\"):
                raise _Malformed('only \\" and \\\\ are escapes in a string')
            chars.append(escaped)
            at += 1
        elif char == '"':
            return "".join(chars), at
        elif " " <= char <= "~":
            chars.append(char)
        else:
            raise _Malformed(f"{char!r} cannot be in a string")
    raise _Malformed("the string has no closing '\"'")


def _parameters(text: str, at: int) -> int:
    """Section 4.2.3.2, Parsing Parameters: ``;``, spaces, a key, and ``=`` with a bare item
    (without one the value is true); again and again. Nothing may come between an item and
    its ``;`` (no whitespace either). A repeated key overwrites: nothing to check here."""
    while at < len(text) and text[at] == ";":
        at += 1
        while at < len(text) and text[at] == " ":
            at += 1
        at = _key(text, at)
        if at < len(text) and text[at] == "=":
            at = _bare_item(text, at + 1)
    return at


def _key(text: str, at: int) -> int:
    """Section 4.2.3.3, Parsing a Key: a lowercase letter or ``*``, then lowercase letters,
    digits, ``_``, ``-``, ``.`` and ``*``."""
    if text[at : at + 1] not in _KEY_FIRST:  # "" (the end) is in no set
        raise _Malformed("a parameter's name must start with a lowercase letter or '*'")
    at += 1
    while at < len(text) and text[at] in _KEY_CHARS:
        at += 1
    return at


def _bare_item(text: str, at: int) -> int:
    """Section 4.2.3.1, Parsing a Bare Item: its type is told by its first character."""
    first = text[at : at + 1]
    if first == "-" or first in _DIGIT:
        return _number(text, at)
    if first == '"':
        return _string(text, at)[1]
    if first in _ALPHA or first == "*":
        return _token(text, at)
    if first == ":":
        return _byte_sequence(text, at)
    if first == "?":
        return _boolean(text, at)
    raise _Malformed(
        "a parameter's value must be a number, a string, a token, a byte sequence or ?0/?1"
    )


def _number(text: str, at: int) -> int:
    """Section 4.2.4, Parsing an Integer or Decimal: an optional ``-``, then at most 15 digits,
    or at most 12 digits, ``.`` and 1 to 3 digits."""
    if text[at] == "-":
        at += 1
    if at >= len(text) or text[at] not in _DIGIT:
        raise _Malformed("a number must have a digit after its sign")
    number = ""
    decimal = False
    while at < len(text):
        char = text[at]
        if char in _DIGIT:
            number += char
        elif char == "." and not decimal:
            if len(number) > 12:
                raise _Malformed("a decimal has at most 12 digits before its '.'")
            number += char
            decimal = True
        else:
            break
        at += 1
        if len(number) > (16 if decimal else 15):
            raise _Malformed("a number has at most 15 digits (a decimal 12 and 3)")
    if decimal and (number.endswith(".") or len(number.split(".")[1]) > 3):
        raise _Malformed("a decimal has 1 to 3 digits after its '.'")
    return at


def _token(text: str, at: int) -> int:
    """Section 4.2.6, Parsing a Token: a letter or ``*``, then tchar, ``:`` and ``/``."""
    at += 1  # the letter or "*" (checked by the caller)
    while at < len(text) and text[at] in _TOKEN_CHARS:
        at += 1
    return at


def _byte_sequence(text: str, at: int) -> int:
    """Section 4.2.7, Parsing a Byte Sequence: base64 between colons (padding may be left
    out, and non-zero pad bits are accepted, as the RFC asks of parsers)."""
    end = text.find(":", at + 1)
    if end < 0:
        raise _Malformed("a byte sequence has no closing ':'")
    content = text[at + 1 : end]
    if any(char not in _BASE64 for char in content):
        raise _Malformed("a byte sequence holds base64 only")
    try:
        binascii.a2b_base64(content + "=" * (-len(content) % 4), strict_mode=True)
    except binascii.Error:
        raise _Malformed("a byte sequence is not valid base64") from None
    return end + 1


def _boolean(text: str, at: int) -> int:
    """Section 4.2.8, Parsing a Boolean: ``?1`` or ``?0``."""
    if text[at + 1 : at + 2] not in ("0", "1"):
        raise _Malformed("a boolean is ?0 or ?1")
    return at + 2


def preferences(request: web.Request) -> dict[str, str]:
    """The request's ``Prefer`` preferences (RFC 7240: a list of preferences, each a token,
    case-insensitive, maybe with a value, quoted or not, and parameters, which are ignored):
    name -> value ('' without one). The first of a name counts; unknown ones are kept and
    ignored by their readers."""
    found: dict[str, str] = {}
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


def prefers_durable(request: web.Request) -> bool:
    """Whether the request asks ``Prefer: durable``."""
    return "durable" in preferences(request)


def prefers_representation(request: web.Request) -> bool:
    """Whether it asks ``Prefer: return=representation`` (RFC 7240 section 4.2), which the
    increment routes honour with ``durable`` only."""
    return preferences(request).get("return", "").lower() == "representation"
