"""Every bad input gets its status and a problem+json body, and changes nothing."""

from __future__ import annotations

import gzip
import json
import lzma
import zlib
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from increment_service import appkeys
from increment_service.errors import MalformedJSON
from increment_service.validation.bodies import MAX_BODY_BYTES, parse_json, parse_json_strict
from tests.support.inprocess import Client
from tests.support.net import JSON, chunked_increment
from tests.support.problems import assert_problem

MAX = 2**53 - 1

# (body bytes, headers, expected status, expected pointers in `errors` or None)
BAD_BODIES: list[tuple[str, bytes, dict[str, str], int, list[str] | None]] = [
    ("malformed", b'{"key": "a", "value": ', JSON, 400, None),
    ("empty body", b"", JSON, 400, None),
    ("duplicate member", b'{"key": "a", "key": "b", "value": 1}', JSON, 400, None),
    ("duplicate escaped", b'{"key": "a", "k\\u0065y": "b", "value": 1}', JSON, 400, None),
    ("nested duplicate", b'{"key": "a", "value": 1, "x": {"y": 1, "y": 2}}', JSON, 400, None),
    ("NaN", b'{"key": "a", "value": NaN}', JSON, 400, None),
    ("Infinity", b'{"key": "a", "value": Infinity}', JSON, 400, None),
    ("-Infinity", b'{"key": "a", "value": -Infinity}', JSON, 400, None),
    ("invalid utf-8", b'{"key": "\xff", "value": 1}', JSON, 400, None),
    ("deep nesting", b"[" * 2000 + b"]" * 2000, JSON, 400, None),
    ("trailing garbage", b'{"key": "a", "value": 1} x', JSON, 400, None),
    ("no content type", b'{"key": "a", "value": 1}', {}, 415, None),
    ("text/plain", b'{"key": "a", "value": 1}', {"Content-Type": "text/plain"}, 415, None),
    ("form", b"key=a&value=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    (
        "latin-1 charset",
        b'{"key": "a", "value": 1}',
        {"Content-Type": "application/json; charset=latin-1"},
        415,
        None,
    ),
    ("array", b'[{"key": "a", "value": 1}]', JSON, 422, [""]),
    ("string", b'"a"', JSON, 422, [""]),
    ("null", b"null", JSON, 422, [""]),
    ("number", b"1", JSON, 422, [""]),
    ("missing key", b'{"value": 1}', JSON, 422, ["/key"]),
    ("missing value", b'{"key": "a"}', JSON, 422, ["/value"]),
    ("empty object", b"{}", JSON, 422, ["/key", "/value"]),
    ("unknown member", b'{"key": "a", "value": 1, "extra": 1}', JSON, 422, ["/extra"]),
    ("unknown member ~/", b'{"key": "a", "value": 1, "a/b~": 1}', JSON, 422, ["/a~1b~0"]),
    ("key number", b'{"key": 1, "value": 1}', JSON, 422, ["/key"]),
    ("key null", b'{"key": null, "value": 1}', JSON, 422, ["/key"]),
    ("key empty", b'{"key": "", "value": 1}', JSON, 422, ["/key"]),
    ("key 257", b'{"key": "' + b"k" * 257 + b'", "value": 1}', JSON, 422, ["/key"]),
    ("key NUL", b'{"key": "a\\u0000b", "value": 1}', JSON, 422, ["/key"]),
    ("key newline", b'{"key": "a\\nb", "value": 1}', JSON, 422, ["/key"]),
    ("key DEL", b'{"key": "a\\u007fb", "value": 1}', JSON, 422, ["/key"]),
    ("key C1", b'{"key": "a\\u0085b", "value": 1}', JSON, 422, ["/key"]),
    ("key lone high surrogate", b'{"key": "a\\ud800", "value": 1}', JSON, 422, ["/key"]),
    ("key lone low surrogate", b'{"key": "\\udc00a", "value": 1}', JSON, 422, ["/key"]),
    ("value true", b'{"key": "a", "value": true}', JSON, 422, ["/value"]),
    ("value false", b'{"key": "a", "value": false}', JSON, 422, ["/value"]),
    ("value 1.0", b'{"key": "a", "value": 1.0}', JSON, 422, ["/value"]),
    ("value 1e2", b'{"key": "a", "value": 1e2}', JSON, 422, ["/value"]),
    ("value 1.5", b'{"key": "a", "value": 1.5}', JSON, 422, ["/value"]),
    ("value huge float", b'{"key": "a", "value": 1e400}', JSON, 422, ["/value"]),
    ("value string", b'{"key": "a", "value": "1"}', JSON, 422, ["/value"]),
    ("value null", b'{"key": "a", "value": null}', JSON, 422, ["/value"]),
    ("value list", b'{"key": "a", "value": [1]}', JSON, 422, ["/value"]),
    ("value 2^53", b'{"key": "a", "value": 9007199254740992}', JSON, 422, ["/value"]),
    ("value -2^53", b'{"key": "a", "value": -9007199254740992}', JSON, 422, ["/value"]),
    ("value 2^64", b'{"key": "a", "value": 18446744073709551616}', JSON, 422, ["/value"]),
    ("both wrong", b'{"key": 5, "value": "x"}', JSON, 422, ["/key", "/value"]),
    (
        "too large",
        b'{"key": "a", "value": 1, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}',
        JSON,
        413,
        None,
    ),
]


async def assert_nothing_changed(client: Client, pg: asyncpg.Connection) -> None:
    write_behind = client.app[appkeys.WRITE_BEHIND]
    assert write_behind.aggregator.is_empty
    await write_behind.flush()
    assert await pg.fetchval("SELECT count(*) FROM counters") == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "pointers"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
@pytest.mark.parametrize("path", ["/increment"])
async def test_bad_increment_is_a_problem_and_changes_nothing(
    client: Client,
    pg: asyncpg.Connection,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    pointers: list[str] | None,
) -> None:
    response = await client.post(path, data=body, headers=headers)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    await assert_problem(response, status, pointers)
    await assert_nothing_changed(client, pg)


async def test_chunked_body_over_the_limit_is_413(client: Client, pg: asyncpg.Connection) -> None:
    response = await client.post("/increment", data=chunked_increment(pad_kib=8), headers=JSON)
    assert response.status == 413
    assert response.content_type == "application/problem+json"
    await assert_nothing_changed(client, pg)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_is_405_with_allow(
    client: Client, pg: asyncpg.Connection, method: str
) -> None:
    response = await client.request(method, "/increment", json={"key": "a", "value": 1})
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert response.content_type == "application/problem+json"
    await assert_problem(response, 405, None)
    await assert_nothing_changed(client, pg)


async def test_unknown_path_is_a_404_problem(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    await assert_problem(response, 404, None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("k" * 256, MAX),
        ("a", -MAX),
        ("zero", 0),
        ("ünïcödé ключ 鍵 🔑", 3),
        ('spaces and "quotes" and /slashes/ and \\', 1),
        ("\u200b zero width is not a control character", 1),
    ],
)
async def test_edge_of_the_valid_range_is_accepted(
    client: Client, pg: asyncpg.Connection, key: str, value: int
) -> None:
    response = await client.post("/increment", json={"key": key, "value": value})
    assert response.status == 202
    await client.app[appkeys.WRITE_BEHIND].flush()
    assert await pg.fetchval("SELECT value FROM counters WHERE key = $1", key) == value


async def test_charset_utf8_is_accepted(client: Client) -> None:
    response = await client.post(
        "/increment",
        data=b'{"key": "a", "value": 1}',
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status == 202


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
async def test_no_input_produces_a_500(client: Client, body: bytes) -> None:
    response = await client.post("/increment", data=body, headers=JSON)
    assert response.status in (202, 400, 413, 422)
    if response.status != 202:
        assert response.content_type == "application/problem+json"


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


_PLAIN = b'{"key": "a", "value": 1}'
_CRC_BROKEN = _gzip(_PLAIN)[:-8] + b"\x00\x00\x00\x00" + _gzip(_PLAIN)[-4:]

# (content coding, body): every one refused with 415, none inflated or parsed.
ENCODED_BODIES: list[tuple[str, str, bytes]] = [
    ("gzip", "gzip", _gzip(_PLAIN)),
    ("gzip on plain JSON", "gzip", _PLAIN),
    ("gzip with a bad CRC", "gzip", _CRC_BROKEN),
    ("gzip without its trailer", "gzip", _gzip(_PLAIN)[:-8]),
    ("deflate", "deflate", zlib.compress(_PLAIN)),
    ("deflate, corrupt", "deflate", b"\x78\x9c not deflate"),
    ("x-gzip", "x-gzip", _gzip(_PLAIN)),
    ("br", "br", b"\x0b\x0b\x80" + _PLAIN + b"\x03"),
    ("xz (unknown to aiohttp)", "xz", lzma.compress(_PLAIN)),
    ("upper case", "GZIP", _gzip(_PLAIN)),
    ("a list ending in identity", "gzip, identity", _gzip(_PLAIN)),
]


@pytest.mark.parametrize(
    ("coding", "body"), [c[1:] for c in ENCODED_BODIES], ids=[c[0] for c in ENCODED_BODIES]
)
async def test_compressed_bodies_are_refused_with_415(
    client: Client, pg: asyncpg.Connection, coding: str, body: bytes
) -> None:
    response = await client.post(
        "/increment", data=body, headers={**JSON, "Content-Encoding": coding}
    )
    assert response.status == 415
    assert response.content_type == "application/problem+json"
    assert response.headers["Accept-Encoding"] == "identity"  # RFC 7694
    await assert_problem(response, 415, None)
    await assert_nothing_changed(client, pg)


ROUTES = [
    ("POST", "/increment"),
    ("POST", "/api/increment"),
    ("GET", "/api/counters/a"),
    ("GET", "/api/counters"),
    ("POST", "/api/counters/lookup"),
    ("POST", "/api/users"),
    ("POST", "/api/sessions"),
    ("GET", "/api/sessions"),
    ("DELETE", "/api/sessions"),
    ("GET", "/api/health"),
    ("GET", "/health"),
    ("GET", "/livez"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
    ("POST", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_refuses_a_compressed_body(
    client: Client, pg: asyncpg.Connection, method: str, path: str
) -> None:
    corrupt = _CRC_BROKEN  # once a 500 on every route that read its body
    response = await client.request(
        method, path, data=corrupt, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert response.status == 415
    assert response.content_type == "application/problem+json"
    await assert_nothing_changed(client, pg)
    assert await pg.fetchval("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize("coding", ["identity", "Identity", ""])
async def test_identity_is_no_coding(client: Client, coding: str) -> None:
    response = await client.post(
        "/increment", data=_PLAIN, headers={**JSON, "Content-Encoding": coding}
    )
    assert response.status == 202


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
_NAMES = st.sampled_from(["key", "value", "a", "é", 'q"', "b\\\\"]) | st.text(max_size=4)


@st.composite
def _json_texts(draw: st.DrawFn, depth: int = 2) -> str:
    """JSON-ish text, duplicate member names and all: what a client may really send."""
    if depth == 0 or draw(st.booleans()):
        return json.dumps(draw(_SCALARS))
    if draw(st.booleans()):
        items = draw(st.lists(_json_texts(depth - 1), max_size=3))
        return "[" + ",".join(items) + "]"
    members = draw(
        st.lists(st.tuples(_NAMES, _json_texts(depth - 1)), max_size=4).map(
            lambda pairs: [f"{json.dumps(name)}: {text}" for name, text in pairs]
        )
    )
    return "{" + ", ".join(members) + "}"


def _outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return ("value", parse(body))
    except MalformedJSON:
        return ("400", None)


@settings(max_examples=600, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=60),
        _json_texts().map(str.encode),
        _json_texts().map(lambda text: text.replace("1", "NaN").encode()),
    )
)
def test_the_fast_parser_agrees_with_the_strict_one(body: bytes) -> None:
    """orjson answers first; whatever it lets through must be what the strict rules give."""
    assert _outcome(parse_json, body) == _outcome(parse_json_strict, body)


_BATCH_NAMES = st.sampled_from(["increments", "key", "value"])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=12),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["increments", "key", "value"]), inner, max_size=3
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps({"increments": v} if isinstance(v, list) else v).encode()),
    ),
    # What a client can put in a header: no control characters (aiohttp's client refuses them).
    idempotency_key=st.none()
    | st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_categories=["Cc"]),
        max_size=300,
    ),
    prefer=st.none() | st.sampled_from(["durable", "DURABLE; x=1", "respond-async", ",,", ""]),
)
async def test_no_batch_or_header_produces_a_500(
    client: Client, body: bytes, idempotency_key: str | None, prefer: str | None
) -> None:
    headers = dict(JSON)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    if prefer is not None:
        headers["Prefer"] = prefer
    response = await client.post("/increments", data=body, headers=headers)
    assert response.status in (200, 202, 204, 400, 409, 413, 422, 503)
    if response.status >= 400:
        assert response.content_type == "application/problem+json"
