"""validation/accounts.py alone: sign-up and login bodies, the 254-character email and the
8 and 72 byte password limits at their exact values and one past."""

from __future__ import annotations

import json
from typing import Any

import pytest

from increment_service.errors import ValidationFailed
from increment_service.validation.accounts import (
    MAX_PASSWORD_BYTES,
    MIN_PASSWORD_BYTES,
    password_bytes,
    read_credentials,
    read_new_user,
)
from tests.unit.requests import request

LENGTH = "must be 8 to 72 bytes in UTF-8"


def address(length: int) -> str:
    """An address of exactly ``length`` characters."""
    return "a" * (length - len("@example.com")) + "@example.com"


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_the_limits() -> None:
    assert (MIN_PASSWORD_BYTES, MAX_PASSWORD_BYTES) == (8, 72)
    assert password_bytes("\u00e9") == b"\xc3\xa9"
    assert password_bytes("\ud800") is None


@pytest.mark.parametrize(
    "password", ["p" * 8, "p" * 72, "\u00e9" * 36, "\u00e9" * 4], ids=["8", "72", "72b", "8b"]
)
async def test_a_new_user_at_the_limits(password: str) -> None:
    email = address(254)
    got = await read_new_user(request(body({"email": email, "password": password})))
    assert got == (email, email, password.encode())


async def test_the_email_key_is_its_normal_form() -> None:
    got = await read_new_user(request(body({"email": "Ann@Example.COM", "password": "p" * 8})))
    assert got == ("Ann@Example.COM", "ann@example.com", b"p" * 8)


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({"email": address(255), "password": "p" * 8}, [("/email", "must be an email address")]),
        ({"email": "nope", "password": "p" * 8}, [("/email", "must be an email address")]),
        ({"email": 1, "password": "p" * 8}, [("/email", "must be a string")]),
        ({"email": address(20), "password": "p" * 7}, [("/password", LENGTH)]),
        ({"email": address(20), "password": "p" * 73}, [("/password", LENGTH)]),
        ({"email": address(20), "password": "\u00e9" * 36 + "p"}, [("/password", LENGTH)]),
        ({"email": address(20), "password": "\u00e9" * 3 + "p"}, [("/password", LENGTH)]),
        (
            {"email": address(20), "password": "\ud800" * 8},
            [("/password", "must be valid Unicode")],
        ),
        ({"email": address(20), "password": None}, [("/password", "must be a string")]),
        ({}, [("/email", "is required"), ("/password", "is required")]),
        (
            {"email": 1, "password": 1, "x": 1},
            [
                ("/x", "is not a known member"),
                ("/email", "must be a string"),
                ("/password", "must be a string"),
            ],
        ),
    ],
)
async def test_each_problem_of_a_new_user_has_its_pointer(
    data: dict[str, Any], errors: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await read_new_user(request(body(data)))
    assert refused.value.detail == "the user body is invalid"
    assert [(e["pointer"], e["detail"]) for e in refused.value.errors or []] == errors


async def test_credentials_that_could_match() -> None:
    got = await read_credentials(request(body({"email": "Ann@example.com", "password": "pw"})))
    assert got == ("ann@example.com", b"pw")
    at_most = await read_credentials(request(body({"email": address(254), "password": "p" * 72})))
    assert at_most == (address(254), b"p" * 72)


@pytest.mark.parametrize(
    ("data", "want"),
    [
        ({"email": address(255), "password": "p" * 8}, (None, b"p" * 8)),
        ({"email": address(4000), "password": "p" * 8}, (None, b"p" * 8)),
        ({"email": "nope", "password": "p" * 8}, (None, b"p" * 8)),
        ({"email": address(20), "password": "p" * 73}, (address(20), None)),
        ({"email": address(20), "password": "\ud800"}, (address(20), None)),
        ({"email": address(20), "password": ""}, (address(20), b"")),
    ],
)
async def test_credentials_that_could_never_match_are_none_not_422(
    data: dict[str, Any], want: tuple[str | None, bytes | None]
) -> None:
    assert await read_credentials(request(body(data))) == want


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({"email": 1, "password": "p"}, [("/email", "must be a string")]),
        ({"email": "a@b.c", "password": 1}, [("/password", "must be a string")]),
        ({"email": "a@b.c"}, [("/password", "is required")]),
        ({"password": "p", "y": 1}, [("/email", "is required"), ("/y", "is not a known member")]),
    ],
)
async def test_each_problem_of_a_login_body_has_its_pointer(
    data: dict[str, Any], errors: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await read_credentials(request(body(data)))
    assert refused.value.detail == "the login body is invalid"
    assert [(e["pointer"], e["detail"]) for e in refused.value.errors or []] == errors
