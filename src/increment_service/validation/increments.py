"""Increment bodies: ``{"key", "value"}`` alone, or 1 to MAX_BATCH_ITEMS of them in
``{"increments": [...]}``. The rule for a counter key and the rule for a value are each defined
once, here; the common case takes one fast test of both, and any doubt goes through the checks
that name every bad member."""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from aiohttp import web

from ..errors import ValidationFailed
from .bodies import Errors, check_members, check_object, read_json, require_object

MAX_KEY_CHARS = 256
MAX_SAFE_INTEGER = 2**53 - 1
#: A batch (POST /increments): 1 to 1000 increments in at most 128 KiB.
MAX_BATCH_ITEMS = 1000
MAX_BATCH_BODY_BYTES = 128 * 1024

# Control characters (C0, DEL, C1) and lone surrogates, which UTF-8 cannot carry to Postgres.
_FORBIDDEN_IN_KEY = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

Increment = tuple[str, int]


def is_key(key: str) -> bool:
    """The rule of a counter key: 1 to MAX_KEY_CHARS characters, none of them a control
    character or a lone surrogate."""
    return 1 <= len(key) <= MAX_KEY_CHARS and not _FORBIDDEN_IN_KEY.search(key)


def is_value(value: object) -> TypeGuard[int]:
    """The rule of a value: an integer (not a boolean) that JavaScript holds exactly."""
    # bool is a subclass of int; `true` is not a number.
    return type(value) is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER


def key_problem(key: Any) -> str | None:
    """What is wrong with a key, in words (None: nothing)."""
    if not isinstance(key, str):
        return "must be a string"
    if is_key(key):
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        return f"must be 1 to {MAX_KEY_CHARS} characters"
    return "must not contain control characters or lone surrogates"


def _value_problem(value: Any) -> str | None:
    if is_value(value):
        return None
    if type(value) is not int:
        return "must be an integer"
    return "must be between -(2^53-1) and 2^53-1 inclusive"


def _plain(data: Any) -> Increment | None:
    """The common case in one test; None if anything is in doubt."""
    if type(data) is dict and len(data) == 2:
        key, value = data.get("key"), data.get("value")
        if type(key) is str and is_value(value) and is_key(key):
            return key, value
    return None


def _check(data: dict[str, Any], errors: Errors, at: str = "") -> Increment:
    """The members of an increment object: each problem appended to ``errors``."""
    check_members(data, ("key", "value"), errors, at)
    key, value = "", 0
    if "key" in data:
        problem = key_problem(data["key"])
        if problem is None:
            key = data["key"]
        else:
            errors.append({"pointer": f"{at}/key", "detail": problem})
    if "value" in data:
        problem = _value_problem(data["value"])
        if problem is None:
            value = data["value"]
        else:
            errors.append({"pointer": f"{at}/value", "detail": problem})
    return key, value


async def read_increment(request: web.Request) -> Increment:
    """The ``(key, value)`` of an increment body, or a problem naming every bad member."""
    data = await read_json(request)
    plain = _plain(data)
    if plain is not None:
        return plain
    errors: Errors = []
    increment = _check(require_object(data), errors)
    if errors:
        raise ValidationFailed("the increment body is invalid", errors=errors)
    return increment


async def read_increments(request: web.Request) -> list[Increment]:
    """A batch body ``{"increments": [{"key", "value"}, ...]}``: 1 to MAX_BATCH_ITEMS items,
    all valid or a problem pointing at every bad one (``/increments/17/value``)."""
    errors: Errors = []
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
    assert isinstance(given, list)  # "increments" present and a list, or errors above
    items: list[Increment] = []
    for n, entry in enumerate(given):
        at = f"/increments/{n}"
        item = _plain(entry)
        if item is None:
            if isinstance(entry, dict):
                item = _check(entry, errors, at)
            else:
                errors.append({"pointer": at, "detail": "must be an object"})
                item = ("", 0)
        items.append(item)
    if errors:
        raise ValidationFailed("the batch body is invalid", errors=errors)
    return items
