"""validation/reads.py alone: a lookup body and a listing's query, each rule at its exact limit
and one past, and the pointer and words of every problem."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import MultiDict

from increment_service.errors import PayloadTooLarge, ValidationFailed
from increment_service.validation.reads import (
    DEFAULT_PAGE_LIMIT,
    MAX_LOOKUP_BODY_BYTES,
    MAX_LOOKUP_KEYS,
    MAX_PAGE_LIMIT,
    PageQuery,
    read_lookup,
    read_page_query,
)
from tests.unit.requests import request

LENGTH = "must be 1 to 256 characters"
CONTROL = "must not contain control characters or lone surrogates"
LIMIT = "must be an integer from 1 to 1000"


def test_the_limits() -> None:
    assert (MAX_LOOKUP_KEYS, MAX_LOOKUP_BODY_BYTES) == (1000, 1024 * 1024)
    assert (DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT) == (100, 1000)


# --- a lookup body ----------------------------------------------------------------------------


async def lookup_problems(data: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_lookup(request(json.dumps(data).encode()))
    assert refused.value.detail == "the lookup body is invalid"
    assert refused.value.errors is not None
    return refused.value.errors


@pytest.mark.parametrize(
    "keys",
    [["a"], ["a", "a"], ["k" * 256], ["k"] * MAX_LOOKUP_KEYS, ["\U0001f600", "a b%_\\+"]],
)
async def test_a_lookup_takes_1_to_1000_keys_repeats_and_all(keys: list[str]) -> None:
    assert await read_lookup(request(json.dumps({"keys": keys}).encode())) == keys


@pytest.mark.parametrize("keys", [[], ["a"] * (MAX_LOOKUP_KEYS + 1), "a", {"a": 1}, None, 1])
async def test_keys_must_be_an_array_of_1_to_1000(keys: Any) -> None:
    assert await lookup_problems({"keys": keys}) == [
        {"pointer": "/keys", "detail": "must be an array of 1 to 1000 keys"}
    ]


async def test_keys_are_required_and_alone() -> None:
    assert await lookup_problems({}) == [{"pointer": "/keys", "detail": "is required"}]
    assert await lookup_problems({"keys": ["a"], "x": 1}) == [
        {"pointer": "/x", "detail": "is not a known member"}
    ]
    assert await lookup_problems({"keys": [], "x": 1}) == [
        {"pointer": "/x", "detail": "is not a known member"},
        {"pointer": "/keys", "detail": "must be an array of 1 to 1000 keys"},
    ]


async def test_every_bad_key_is_named() -> None:
    assert await lookup_problems({"keys": ["a", 1, "", "k" * 257, "a\u0085", "b"]}) == [
        {"pointer": "/keys/1", "detail": "must be a string"},
        {"pointer": "/keys/2", "detail": LENGTH},
        {"pointer": "/keys/3", "detail": LENGTH},
        {"pointer": "/keys/4", "detail": CONTROL},
    ]


async def test_a_lookup_body_is_at_most_one_mebibyte() -> None:
    at_limit = b'{"keys": ["' + b"k" * (MAX_LOOKUP_BODY_BYTES - 14) + b'"]}'
    assert len(at_limit) == MAX_LOOKUP_BODY_BYTES
    # At the limit the body is read (and its one key is too long); one byte more, it is not.
    assert await lookup_problems_raw(at_limit) == [{"pointer": "/keys/0", "detail": LENGTH}]
    over = at_limit[:11] + b"k" + at_limit[11:]
    # (A chunked one is cut off by the app's client_max_size: tests/test_reads.py.)
    with pytest.raises(PayloadTooLarge) as refused:
        await read_lookup(request(over))
    assert refused.value.detail == f"the body may be at most {MAX_LOOKUP_BODY_BYTES} bytes"
    chunked = await lookup_problems_raw_chunked(at_limit)
    assert chunked == [{"pointer": "/keys/0", "detail": LENGTH}]


async def lookup_problems_raw_chunked(body: bytes) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_lookup(request(body, length=False))
    assert refused.value.errors is not None
    return refused.value.errors


async def lookup_problems_raw(body: bytes) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        await read_lookup(request(body))
    assert refused.value.errors is not None
    return refused.value.errors


async def test_a_lookup_body_must_be_an_object() -> None:
    with pytest.raises(ValidationFailed) as refused:
        await read_lookup(request(b'["a"]'))
    assert refused.value.errors == [{"pointer": "", "detail": "must be an object"}]


# --- a listing's query ------------------------------------------------------------------------


def page_query(*pairs: tuple[str, str]) -> PageQuery:
    return read_page_query(MultiDict(pairs))


def query_problems(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as refused:
        page_query(*pairs)
    assert refused.value.detail == "the listing's query is invalid"
    assert refused.value.errors is not None
    return refused.value.errors


def test_no_parameter_is_the_first_page_of_every_counter() -> None:
    assert page_query() == PageQuery("", None, 100)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((("prefix", "a"),), PageQuery("a", None, 100)),
        ((("prefix", "k" * 256),), PageQuery("k" * 256, None, 100)),
        ((("prefix", ""),), PageQuery("", None, 100)),
        ((("after", "b"), ("prefix", "a")), PageQuery("a", "b", 100)),
        ((("after", ""),), PageQuery("", None, 100)),
        ((("after", "k" * 256),), PageQuery("", "k" * 256, 100)),
        ((("limit", "1"),), PageQuery("", None, 1)),
        ((("limit", "1000"),), PageQuery("", None, 1000)),
        ((("limit", "0007"),), PageQuery("", None, 7)),
        ((("limit", "000000999"),), PageQuery("", None, 999)),
    ],
)
def test_a_good_query(pairs: tuple[tuple[str, str], ...], expected: PageQuery) -> None:
    assert page_query(*pairs) == expected


@pytest.mark.parametrize(
    "limit", ["0", "1001", "-1", "+5", " 5", "5 ", "1.0", "ten", "", "\u0665", "0000000001", "5_0"]
)
def test_a_bad_limit(limit: str) -> None:
    assert query_problems(("limit", limit)) == [{"pointer": "/limit", "detail": LIMIT}]


def test_a_bad_prefix() -> None:
    assert query_problems(("prefix", "k" * 257)) == [
        {"pointer": "/prefix", "detail": "must be at most 256 characters"}
    ]
    assert query_problems(("prefix", "a\x00")) == [{"pointer": "/prefix", "detail": CONTROL}]
    # As long as a prefix may be, and still not one: its character is what is wrong.
    assert query_problems(("prefix", "k" * 255 + "\x00")) == [
        {"pointer": "/prefix", "detail": CONTROL}
    ]
    assert query_problems(("prefix", "\ud800")) == [{"pointer": "/prefix", "detail": CONTROL}]


def test_a_bad_after() -> None:
    assert query_problems(("after", "k" * 257)) == [{"pointer": "/after", "detail": LENGTH}]
    assert query_problems(("after", "a\x7f")) == [{"pointer": "/after", "detail": CONTROL}]


def test_each_parameter_at_most_once_and_no_other() -> None:
    assert query_problems(("limit", "1"), ("limit", "1")) == [
        {"pointer": "/limit", "detail": "must be given at most once"}
    ]
    assert query_problems(("prefix", "a"), ("prefix", "a")) == [
        {"pointer": "/prefix", "detail": "must be given at most once"}
    ]
    assert query_problems(("after", "a"), ("after", "b")) == [
        {"pointer": "/after", "detail": "must be given at most once"}
    ]
    assert query_problems(("cursor", "a")) == [
        {"pointer": "/cursor", "detail": "is not a known parameter"}
    ]


def test_every_problem_at_once_in_order() -> None:
    assert query_problems(
        ("page", "2"), ("limit", "0"), ("prefix", "a\x00"), ("after", "\x01")
    ) == [
        {"pointer": "/page", "detail": "is not a known parameter"},
        {"pointer": "/prefix", "detail": CONTROL},
        {"pointer": "/after", "detail": CONTROL},
        {"pointer": "/limit", "detail": LIMIT},
    ]
