"""validation/tokens.py alone: the new-token body (every member at its limits and one past,
each problem's pointer and words), the bearer credentials of a request (RFC 6750 section 2.1:
the header only) and a token id in a path."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from increment_service.errors import InvalidToken, NotFound, TokenInQuery, ValidationFailed
from increment_service.validation.tokens import (
    MAX_EXPIRES_SECONDS,
    MAX_NAME_CHARS,
    MIN_EXPIRES_SECONDS,
    SCOPES,
    bearer,
    read_new_token,
    token_id,
)
from tests.unit.requests import request

NAME_LENGTH = "must be 1 to 100 characters"
NAME_CHARACTERS = "must not contain control characters or lone surrogates"
NOT_A_LIST = "must be a non-empty list of increment, read"
NOT_A_SCOPE = "each scope must be one of increment, read"
TWICE = "must not name a scope twice"
NOT_SECONDS = "must be an integer (seconds)"
RANGE = "must be between 60 and 31536000 seconds"


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_the_limits() -> None:
    assert SCOPES == ("increment", "read")
    assert MAX_NAME_CHARS == 100
    assert (MIN_EXPIRES_SECONDS, MAX_EXPIRES_SECONDS) == (60, 31_536_000)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "n", "scopes": ["read"]}, ("n", ("read",), None)),
        ({"name": "n" * 100, "scopes": ["increment"]}, ("n" * 100, ("increment",), None)),
        ({"name": "x", "scopes": ["read", "increment"]}, ("x", ("increment", "read"), None)),
        ({"name": "x", "scopes": ["read"], "expiresInSeconds": 60}, ("x", ("read",), 60)),
        (
            {"name": "x", "scopes": ["read"], "expiresInSeconds": 31_536_000},
            ("x", ("read",), 31_536_000),
        ),
        ({"name": "x", "scopes": ["read"], "expiresInSeconds": None}, ("x", ("read",), None)),
        ({"name": "\u00e9 \U0001f600", "scopes": ["read"]}, ("\u00e9 \U0001f600", ("read",), None)),
    ],
)
async def test_valid_bodies(data: dict[str, Any], expected: tuple[Any, ...]) -> None:
    assert await read_new_token(request(body(data))) == expected


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({}, [("/name", "is required"), ("/scopes", "is required")]),
        ({"scopes": ["read"]}, [("/name", "is required")]),
        ({"name": "n"}, [("/scopes", "is required")]),
        ({"name": "n", "scopes": ["read"], "other": 1}, [("/other", "is not a known member")]),
        ({"name": "", "scopes": ["read"]}, [("/name", NAME_LENGTH)]),
        ({"name": "n" * 101, "scopes": ["read"]}, [("/name", NAME_LENGTH)]),
        ({"name": 1, "scopes": ["read"]}, [("/name", "must be a string")]),
        ({"name": None, "scopes": ["read"]}, [("/name", "must be a string")]),
        ({"name": "a\x00", "scopes": ["read"]}, [("/name", NAME_CHARACTERS)]),
        ({"name": "a\x1f", "scopes": ["read"]}, [("/name", NAME_CHARACTERS)]),
        ({"name": "a\x7f", "scopes": ["read"]}, [("/name", NAME_CHARACTERS)]),
        ({"name": "a\x9f", "scopes": ["read"]}, [("/name", NAME_CHARACTERS)]),
        ({"name": "n", "scopes": []}, [("/scopes", NOT_A_LIST)]),
        ({"name": "n", "scopes": "read"}, [("/scopes", NOT_A_LIST)]),
        ({"name": "n", "scopes": None}, [("/scopes", NOT_A_LIST)]),
        ({"name": "n", "scopes": ["read", "write"]}, [("/scopes", NOT_A_SCOPE)]),
        ({"name": "n", "scopes": [1]}, [("/scopes", NOT_A_SCOPE)]),
        ({"name": "n", "scopes": ["Read"]}, [("/scopes", NOT_A_SCOPE)]),
        ({"name": "n", "scopes": ["read", "read"]}, [("/scopes", TWICE)]),
        (
            {"name": "n", "scopes": ["increment", "read", "increment"]},
            [("/scopes", TWICE)],
        ),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 59}, [("/expiresInSeconds", RANGE)]),
        (
            {"name": "n", "scopes": ["read"], "expiresInSeconds": 31_536_001},
            [("/expiresInSeconds", RANGE)],
        ),
        (
            {"name": "n", "scopes": ["read"], "expiresInSeconds": 60.0},
            [("/expiresInSeconds", NOT_SECONDS)],
        ),
        (
            {"name": "n", "scopes": ["read"], "expiresInSeconds": True},
            [("/expiresInSeconds", NOT_SECONDS)],
        ),
        (
            {"name": "n", "scopes": ["read"], "expiresInSeconds": "60"},
            [("/expiresInSeconds", NOT_SECONDS)],
        ),
        (
            {"name": "", "scopes": [], "expiresInSeconds": 0, "x": 1},
            [
                ("/x", "is not a known member"),
                ("/name", NAME_LENGTH),
                ("/scopes", NOT_A_LIST),
                ("/expiresInSeconds", RANGE),
            ],
        ),
    ],
)
async def test_each_problem_named_by_its_pointer(
    data: dict[str, Any], errors: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await read_new_token(request(body(data)))
    assert refused.value.detail == "the token body is invalid"
    got = [(e["pointer"], e["detail"]) for e in refused.value.errors or []]
    assert got == errors


async def test_a_body_that_is_not_an_object() -> None:
    with pytest.raises(ValidationFailed):
        await read_new_token(request(body(["name"])))


def get(path: str = "/", authorization: str | None = None) -> Any:
    headers: CIMultiDict[str] = CIMultiDict()
    if authorization is not None:
        headers["Authorization"] = authorization
    return make_mocked_request("GET", path, headers=headers)


@pytest.mark.parametrize(
    ("authorization", "token"),
    [
        (None, None),
        ("Basic dTpw", None),
        ("Bearerx abc", None),
        ("Digest Bearer abc", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer a-._~+/Z9==", "a-._~+/Z9=="),
        ("Bearer XabcX", "XabcX"),
    ],
)
def test_the_bearer_token_of_a_request(authorization: str | None, token: str | None) -> None:
    assert bearer(get(authorization=authorization)) == token


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer ", "Bearer a b", "Bearer =abc", "Bearer a=b", "Bearer é", "Bearer \tabc"],
)
def test_a_bearer_without_a_well_shaped_token_is_an_invalid_token(authorization: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        bearer(get(authorization=authorization))
    assert refused.value.detail == "the Authorization header holds no bearer token"
    assert refused.value.status == 401
    assert 'error="invalid_token"' in refused.value.headers["WWW-Authenticate"]


@pytest.mark.parametrize("path", ["/?access_token=x", "/?a=1&access_token=", "/?access_token"])
def test_a_token_in_the_query_string_is_refused(path: str) -> None:
    with pytest.raises(TokenInQuery) as refused:
        bearer(get(path, "Bearer abc"))
    assert refused.value.status == 400
    assert 'error="invalid_request"' in refused.value.headers["WWW-Authenticate"]


@pytest.mark.parametrize("path", ["/?x=access_token", "/?access_tokens=1", "/?token=1"])
def test_other_query_strings_are_not_a_token(path: str) -> None:
    assert bearer(get(path, "Bearer abc")) == "abc"


def test_a_token_id_is_a_uuid_or_not_found() -> None:
    known = uuid.uuid4()
    found = make_mocked_request("DELETE", "/", match_info={"id": str(known)})
    assert token_id(found) == known
    for strange in ("", "x", str(known) + "0", "%00"):
        with pytest.raises(NotFound) as refused:
            token_id(make_mocked_request("DELETE", "/", match_info={"id": strange}))
        assert refused.value.detail == "no token of yours has that id"
