"""validation/increments.py alone: the key and value rules at their exact limits and one past,
single and batch bodies, and the JSON pointer of every problem of a mis-shaped batch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from increment_service.errors import PayloadTooLarge, ValidationFailed
from increment_service.validation.increments import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    MAX_KEY_CHARS,
    MAX_SAFE_INTEGER,
    is_key,
    is_value,
    read_increment,
    read_increments,
)
from tests.unit.requests import request

RANGE = "must be between -(2^53-1) and 2^53-1 inclusive"
LENGTH = "must be 1 to 256 characters"
CONTROL = "must not contain control characters or lone surrogates"


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


async def problems_of_batch(data: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_increments(request(body(data)))
    assert refused.value.detail == "the batch body is invalid"
    assert refused.value.errors is not None
    return refused.value.errors


async def problems_of_single(data: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_increment(request(body(data)))
    assert refused.value.detail == "the increment body is invalid"
    assert refused.value.errors is not None
    return refused.value.errors


# --- the rules -----------------------------------------------------------------------------


def test_the_limits() -> None:
    assert (MAX_KEY_CHARS, MAX_SAFE_INTEGER) == (256, 2**53 - 1)
    assert (MAX_BATCH_ITEMS, MAX_BATCH_BODY_BYTES) == (1000, 131072)


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("", False),
        ("a", True),
        ("k" * 256, True),
        ("k" * 257, False),
        ("\u00e9" * 256, True),  # characters, not bytes
        ("a\x00", False),
        ("a\x1f", False),
        ("a\x20b", True),
        ("a\x7e", True),
        ("a\x7f", False),
        ("a\x9f", False),
        ("a\xa0", True),
        ("a\ud800", False),
        ("a" + chr(0xDFFF), False),
        ("a\ue000", True),
        ("\U0001f600", True),
    ],
)
def test_the_key_rule(key: str, ok: bool) -> None:
    assert is_key(key) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),
        (MAX_SAFE_INTEGER, True),
        (-MAX_SAFE_INTEGER, True),
        (MAX_SAFE_INTEGER + 1, False),
        (-MAX_SAFE_INTEGER - 1, False),
        (True, False),
        (False, False),
        (1.0, False),
        ("1", False),
        (None, False),
    ],
)
def test_the_value_rule(value: object, ok: bool) -> None:
    assert is_value(value) is ok


# --- a single increment --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"key": "k" * 256, "value": MAX_SAFE_INTEGER},
        {"value": -MAX_SAFE_INTEGER, "key": "a"},
    ],
)
async def test_a_valid_increment_at_the_limits(data: dict[str, Any]) -> None:
    assert await read_increment(request(body(data))) == (data["key"], data["value"])


async def test_an_increment_padded_to_exactly_the_limit_is_read() -> None:
    head, tail = b'{"key": "k",', b'"value": 1}'
    exact = head + b" " * (4096 - len(head) - len(tail)) + tail
    assert await read_increment(request(exact)) == ("k", 1)
    with pytest.raises(PayloadTooLarge):
        await read_increment(request(exact + b" "))


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({"key": "k" * 257, "value": 1}, [("/key", LENGTH)]),
        ({"key": "", "value": 1}, [("/key", LENGTH)]),
        ({"key": "a\x00", "value": 1}, [("/key", CONTROL)]),
        ({"key": "\x00", "value": 1}, [("/key", CONTROL)]),
        ({"key": "k" * 255 + "\x00", "value": 1}, [("/key", CONTROL)]),
        ({"key": 5, "value": 1}, [("/key", "must be a string")]),
        ({"key": "a", "value": MAX_SAFE_INTEGER + 1}, [("/value", RANGE)]),
        ({"key": "a", "value": -MAX_SAFE_INTEGER - 1}, [("/value", RANGE)]),
        ({"key": "a", "value": True}, [("/value", "must be an integer")]),
        ({"key": "a", "value": 1.5}, [("/value", "must be an integer")]),
        (
            {"key": None, "value": "1"},
            [("/key", "must be a string"), ("/value", "must be an integer")],
        ),
        ({"key": "a"}, [("/value", "is required")]),
        ({"value": 1}, [("/key", "is required")]),
        ({}, [("/key", "is required"), ("/value", "is required")]),
        ({"key": "a", "value": 1, "x": 0}, [("/x", "is not a known member")]),
        (
            {"key": "a\x7f", "value": 1, "v": 2},
            [("/v", "is not a known member"), ("/key", CONTROL)],
        ),
    ],
)
async def test_each_problem_of_an_increment_has_its_pointer(
    data: dict[str, Any], errors: list[tuple[str, str]]
) -> None:
    got = await problems_of_single(data)
    assert [(e["pointer"], e["detail"]) for e in got] == errors


@pytest.mark.parametrize("data", [[1], [1, 2], "ab", 12])
async def test_an_increment_that_is_not_an_object_is_422_at_the_root(data: Any) -> None:
    assert await problems_of_single_root(data) == [{"pointer": "", "detail": "must be an object"}]


async def problems_of_single_root(data: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_increment(request(body(data)))
    assert refused.value.errors is not None
    return refused.value.errors


# --- a batch -------------------------------------------------------------------------------


async def test_a_batch_of_one_and_of_exactly_the_most_items() -> None:
    assert await read_increments(request(body({"increments": [{"key": "a", "value": 1}]}))) == [
        ("a", 1)
    ]
    most = [{"key": f"k{n}", "value": n} for n in range(MAX_BATCH_ITEMS)]
    got = await read_increments(request(body({"increments": most})))
    assert got == [(f"k{n}", n) for n in range(MAX_BATCH_ITEMS)]


async def test_a_batch_of_exactly_128_kib_is_read_and_one_byte_more_is_not() -> None:
    head, tail = b'{"increments": [{"key": "a", "value": 1}]', b"}"
    exact = head + b" " * (MAX_BATCH_BODY_BYTES - len(head) - len(tail)) + tail
    assert await read_increments(request(exact)) == [("a", 1)]
    with pytest.raises(PayloadTooLarge, match="at most 131072 bytes"):
        await read_increments(request(exact + b" "))


ARRAY = "must be an array of 1 to 1000 increments"


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        ({}, [("/increments", "is required")]),
        ({"increments": []}, [("/increments", ARRAY)]),
        ({"increments": {"key": "a", "value": 1}}, [("/increments", ARRAY)]),
        ({"increments": None}, [("/increments", ARRAY)]),
        ({"increments": [{"key": "a", "value": 1}] * 1001}, [("/increments", ARRAY)]),
        (
            {"increments": [], "other": 1},
            [("/other", "is not a known member"), ("/increments", ARRAY)],
        ),
        (
            {
                "increments": [
                    {"key": "ok", "value": 1},
                    [],
                    {"key": "k" * 257, "value": 1},
                    {"key": "a", "value": 2**53},
                    {"key": "a"},
                    {"key": "a", "value": 1, "x/y": 1},
                    "ab",
                    {"key": 1, "value": True},
                ]
            },
            [
                ("/increments/1", "must be an object"),
                ("/increments/2/key", LENGTH),
                ("/increments/3/value", RANGE),
                ("/increments/4/value", "is required"),
                ("/increments/5/x~1y", "is not a known member"),
                ("/increments/6", "must be an object"),
                ("/increments/7/key", "must be a string"),
                ("/increments/7/value", "must be an integer"),
            ],
        ),
    ],
)
async def test_each_problem_of_a_batch_has_its_pointer(
    data: dict[str, Any], errors: list[tuple[str, str]]
) -> None:
    got = await problems_of_batch(data)
    assert [(e["pointer"], e["detail"]) for e in got] == errors


@pytest.mark.parametrize("data", [[], "s", None])
async def test_a_batch_that_is_not_an_object_is_422_at_the_root(data: Any) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await read_increments(request(body(data)))
    assert refused.value.errors == [{"pointer": "", "detail": "must be an object"}]
