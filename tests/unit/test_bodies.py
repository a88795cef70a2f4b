"""validation/bodies.py alone: size limits at their exact value and one past, content types,
content codings, strict JSON, and the JSON pointer of every member problem."""

from __future__ import annotations

import asyncio
import json

import pytest

from increment_service.errors import (
    MalformedJSON,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from increment_service.validation import bodies
from increment_service.validation.bodies import (
    MAX_BODY_BYTES,
    check_members,
    check_object,
    parse_json,
    parse_json_strict,
    pointer,
    read_json,
    refuse_content_coding,
    require_object,
)
from tests.unit.requests import request, streaming


def padded(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    head, tail = b'{"key": "k",', b'"value": 1}'
    return head + b" " * (size - len(head) - len(tail)) + tail


# --- size ----------------------------------------------------------------------------------


def test_the_limit_is_4_kib() -> None:
    assert MAX_BODY_BYTES == 4096


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_not(
    length: bool,
) -> None:
    assert await read_json(request(padded(MAX_BODY_BYTES), length=length)) == {
        "key": "k",
        "value": 1,
    }
    with pytest.raises(PayloadTooLarge) as refused:
        await read_json(request(padded(MAX_BODY_BYTES + 1), length=length))
    assert refused.value.status == 413
    assert refused.value.detail == "the body may be at most 4096 bytes"


async def test_a_route_sets_its_own_limit() -> None:
    assert await read_json(request(padded(100)), max_bytes=100) == {"key": "k", "value": 1}
    with pytest.raises(PayloadTooLarge, match="at most 99 bytes"):
        await read_json(request(padded(100)), max_bytes=99)
    with pytest.raises(PayloadTooLarge, match="at most 99 bytes"):
        await read_json(request(padded(100), length=False), max_bytes=99)


async def test_a_chunked_body_is_read_as_it_comes() -> None:
    request, payload = streaming()

    async def feed() -> None:
        body = padded(MAX_BODY_BYTES)
        for start in range(0, len(body), 1000):  # five chunks, the last one short
            payload.feed_data(body[start : start + 1000])
            await asyncio.sleep(0)
        payload.feed_eof()

    feeder = asyncio.create_task(feed())
    assert await asyncio.wait_for(read_json(request), 5) == {"key": "k", "value": 1}
    await feeder


async def test_a_chunked_body_is_refused_as_soon_as_it_grows_past_the_limit() -> None:
    request, payload = streaming()

    async def feed() -> None:
        for _ in range(3):
            payload.feed_data(b" " * 2048)
            await asyncio.sleep(0)

    feeder = asyncio.create_task(feed())
    # No end ever comes: only a read that stops at the limit can answer (not one that waits
    # for the whole body, as the app's client_max_size would let it).
    with pytest.raises(PayloadTooLarge) as refused:
        await asyncio.wait_for(read_json(request), 5)
    assert refused.value.detail == "the body may be at most 4096 bytes"
    await feeder
    assert not payload.at_eof()


async def test_a_declared_length_past_the_limit_is_refused_before_reading() -> None:
    lying = request(b"{}", [("Content-Length", str(MAX_BODY_BYTES + 1))], length=False)
    with pytest.raises(PayloadTooLarge):
        await read_json(lying)


# --- media type ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=UTF-8",
        "application/json;charset=utf8",
        "Application/JSON",
    ],
)
async def test_json_in_utf_8_is_read(content_type: str) -> None:
    assert await read_json(request(b'{"a": 1}', content_type=content_type)) == {"a": 1}


@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        (None, "send the body as Content-Type: application/json"),
        ("text/plain", "send the body as Content-Type: application/json"),
        ("application/json-patch+json", "send the body as Content-Type: application/json"),
        ("application/json; charset=latin-1", "JSON bodies must be UTF-8"),
        ("application/json; charset=utf-16", "JSON bodies must be UTF-8"),
    ],
)
async def test_other_media_types_are_415(content_type: str | None, detail: str) -> None:
    with pytest.raises(UnsupportedMediaType) as refused:
        await read_json(request(b'{"a": 1}', content_type=content_type))
    assert refused.value.status == 415
    assert refused.value.detail == detail


# --- content coding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codings", [[], ["identity"], ["Identity"], [" identity , "], ["identity", ""]]
)
async def test_no_content_coding_or_identity_is_taken(codings: list[str]) -> None:
    refuse_content_coding(request(b"{}", [("Content-Encoding", c) for c in codings]))


@pytest.mark.parametrize(
    "codings", [["gzip"], ["identity, gzip"], ["identity", "br"], ["GZIP"], ["x-anything"]]
)
async def test_any_content_coding_is_415_with_accept_encoding(codings: list[str]) -> None:
    with pytest.raises(UnsupportedMediaType) as refused:
        refuse_content_coding(request(b"{}", [("Content-Encoding", c) for c in codings]))
    assert refused.value.headers == {"Accept-Encoding": "identity"}
    assert refused.value.detail == (
        "request bodies must not be compressed: send them without Content-Encoding"
    )


# --- strict JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b'{"key": "a", "value": 1}', {"key": "a", "value": 1}),
        (b'{"a": "x\\"y"}', {"a": 'x"y'}),  # a backslash: the strict parser
        (b'{"a": {"b": 1}}', {"a": {"b": 1}}),  # nested: the strict parser
        (b'{"a": [1, "x"]}', {"a": [1, "x"]}),
        (b'[{"a": 1}]', [{"a": 1}]),
        (b"[]", []),
        (b"17", 17),
        (b'"s"', "s"),
        (b"null", None),
        (b'{"a": null, "b": true}', {"a": None, "b": True}),
    ],
)
def test_valid_json_is_parsed(body: bytes, value: object) -> None:
    assert parse_json(body) == value
    assert parse_json_strict(body) == value


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"a": 1, "a": 2}', "the body has a duplicate member name 'a'"),
        (b'{"a": "x", "a": "y"}', "the body has a duplicate member name 'a'"),
        (b'{"a": 1, "b": 1, "b": 2}', "the body has a duplicate member name 'b'"),
        (b'{"o": {"a": 1, "a": 2}}', "the body has a duplicate member name 'a'"),
        (b'[{"a": 1, "a": 2}]', "the body has a duplicate member name 'a'"),
        (b'{"a": "\\u00e9", "a": 1}', "the body has a duplicate member name 'a'"),
        (b"\xff", "the body is not valid UTF-8"),
        (b'{"a": "\xc3"}', "the body is not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "the body is nested too deeply"),
    ],
)
def test_invalid_json_is_400_saying_why(body: bytes, detail: str) -> None:
    with pytest.raises(MalformedJSON) as refused:
        parse_json(body)
    assert refused.value.status == 400
    assert refused.value.detail == detail


@pytest.mark.parametrize(
    "body", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"", b"{", b"{'a': 1}"]
)
def test_not_json_is_400(body: bytes) -> None:
    """(Each says why: see test_a_constant_is_named below.)"""
    with pytest.raises(MalformedJSON, match=r"^the body is not valid JSON: "):
        parse_json(body)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_constant_is_named(constant: str) -> None:
    with pytest.raises(MalformedJSON) as refused:
        parse_json(f'{{"a": {constant}}}'.encode())
    assert refused.value.detail == f"the body is not valid JSON: {constant} is not JSON"


def test_only_a_flat_object_with_every_quote_accounted_for_skips_the_strict_parser() -> None:
    assert bodies._nothing_dropped({"a": 1, "b": "x"}, b'{"a": 1, "b": "x"}')
    assert not bodies._nothing_dropped({"a": 1}, b'{"a": 0, "a": 1}'.replace(b"0", b'"0"'))
    assert not bodies._nothing_dropped({"a": {}}, b'{"a": {}}')
    assert not bodies._nothing_dropped({"a": []}, b'{"a": []}')
    assert not bodies._nothing_dropped([], b"[]")
    assert bodies._nothing_dropped(1, b"1")
    assert bodies._nothing_dropped("s", b'"s"')


# --- the shape of an object, and JSON pointers ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "at", "want"),
    [
        ("key", "", "/key"),
        ("a/b", "", "/a~1b"),
        ("m~n", "", "/m~0n"),
        ("~/", "/increments/3", "/increments/3/~0~1"),
        ("", "", "/"),
    ],
)
def test_pointer_escapes_as_rfc_6901_says(name: str, at: str, want: str) -> None:
    assert pointer(name, at) == want
    if not at:
        assert pointer(name) == want, "at the root by default"


@pytest.mark.parametrize("data", [[], "s", 1, None, True])
def test_a_body_that_is_not_an_object_is_422_at_the_root(data: object) -> None:
    with pytest.raises(ValidationFailed) as refused:
        require_object(data)
    assert refused.value.errors == [{"pointer": "", "detail": "must be an object"}]
    assert refused.value.detail == "the body must be a JSON object"


def test_missing_and_unknown_members_each_have_their_pointer() -> None:
    errors: bodies.Errors = []
    data = {"value": 1, "x/y": 2, "extra": 3}
    assert check_object(data, ("key", "value"), errors) is data
    assert errors == [
        {"pointer": "/key", "detail": "is required"},
        {"pointer": "/x~1y", "detail": "is not a known member"},
        {"pointer": "/extra", "detail": "is not a known member"},
    ]
    nested: bodies.Errors = []
    check_members({"key": 1}, ("key", "value"), nested, "/increments/7")
    assert nested == [{"pointer": "/increments/7/value", "detail": "is required"}]
    exact: bodies.Errors = []
    check_members({"key": 1, "value": 2}, ("key", "value"), exact)
    assert exact == []
    assert json.dumps(errors)  # plain JSON for the problem body
