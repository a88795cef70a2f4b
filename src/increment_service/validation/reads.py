"""Counter reads: the body of a lookup by name (``{"keys": [...]}``) and the query of a listing
by prefix (``prefix``, ``after``, ``limit``). Problems point at what is wrong: into the body
(``/keys/17``), or at a query parameter as if the query were an object (``/limit``)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from ..errors import ValidationFailed
from .bodies import Errors, check_object, read_json
from .increments import MAX_KEY_CHARS, is_key, key_problem

#: A lookup: 1 to 1000 keys in at most 1 MiB (1000 keys of 256 characters of up to 4 UTF-8
#: bytes each, sent unescaped, fit; a URL could not carry them).
MAX_LOOKUP_KEYS = 1000
MAX_LOOKUP_BODY_BYTES = 1024 * 1024

#: A page of the listing: DEFAULT_PAGE_LIMIT counters unless ``limit`` says 1 to MAX_PAGE_LIMIT.
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000

_PAGE_PARAMETERS = ("prefix", "after", "limit")
_LIMIT_RULE = f"must be an integer from 1 to {MAX_PAGE_LIMIT}"


@dataclass(frozen=True, slots=True)
class PageQuery:
    prefix: str  # "" for every counter
    after: str | None  # the last key of the previous page; None for the first page
    limit: int


async def read_lookup(request: web.Request) -> list[str]:
    """The keys of a lookup body ``{"keys": [...]}``: 1 to MAX_LOOKUP_KEYS valid counter keys
    (repeats allowed), or a problem pointing at every bad one."""
    errors: Errors = []
    data = check_object(await read_json(request, MAX_LOOKUP_BODY_BYTES), ("keys",), errors)
    given = data.get("keys")
    if "keys" in data and (not isinstance(given, list) or not 1 <= len(given) <= MAX_LOOKUP_KEYS):
        errors.append(
            {"pointer": "/keys", "detail": f"must be an array of 1 to {MAX_LOOKUP_KEYS} keys"}
        )
    if errors:
        raise ValidationFailed("the lookup body is invalid", errors=errors)
    assert isinstance(given, list)  # "keys" present and a list, or errors above
    for n, key in enumerate(given):
        problem = key_problem(key)
        if problem is not None:
            errors.append({"pointer": f"/keys/{n}", "detail": problem})
    if errors:
        raise ValidationFailed("the lookup body is invalid", errors=errors)
    return given


def read_page_query(query: MultiMapping[str]) -> PageQuery:
    """``prefix`` (0 to 256 characters, a key's characters), ``after`` (a key, or empty for
    the first page) and ``limit`` (1 to MAX_PAGE_LIMIT), each at most once, nothing else; or
    a problem naming every bad parameter."""
    errors: Errors = []
    for name in query:
        if name not in _PAGE_PARAMETERS:
            errors.append({"pointer": f"/{name}", "detail": "is not a known parameter"})
    values: dict[str, str] = {}
    for name in _PAGE_PARAMETERS:
        given = query.getall(name, [])
        if len(given) > 1:
            errors.append({"pointer": f"/{name}", "detail": "must be given at most once"})
        elif given:
            values[name] = given[0]
    prefix = values.get("prefix", "")
    if prefix and not is_key(prefix):
        errors.append({"pointer": "/prefix", "detail": _prefix_problem(prefix)})
    after = values.get("after") or None
    if after is not None and not is_key(after):
        errors.append({"pointer": "/after", "detail": str(key_problem(after))})
    limit = _limit(values.get("limit"))
    if limit is None:
        errors.append({"pointer": "/limit", "detail": _LIMIT_RULE})
    if errors:
        raise ValidationFailed("the listing's query is invalid", errors=errors)
    assert limit is not None  # or errors above
    return PageQuery(prefix, after, limit)


def _prefix_problem(prefix: str) -> str:
    if len(prefix) > MAX_KEY_CHARS:
        return f"must be at most {MAX_KEY_CHARS} characters"
    return "must not contain control characters or lone surrogates"


def _limit(given: str | None) -> int | None:
    if given is None:
        return DEFAULT_PAGE_LIMIT
    # ASCII digits only (int() would take "+5", " 5", "5_0" and other digits), and few of
    # them: no number worth parsing is longer.
    if not (given.isascii() and given.isdigit() and len(given) <= 9):
        return None
    limit = int(given)
    return limit if 1 <= limit <= MAX_PAGE_LIMIT else None
