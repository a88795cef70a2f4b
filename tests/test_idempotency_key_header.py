"""``Idempotency-Key`` as an RFC 8941 item: a string with parameters, parsed by the RFC's
algorithm (section 4.2.3.2) and ignored; a malformed parameter is a 400; a bare token is taken
whole, a ``;`` in it included.

The parser is tested on its own for many forms; two HTTP tests (real Postgres) show a
parameter ignored end to end (the same key with or without it) and a malformed one refused.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from increment_service import appkeys
from increment_service.errors import InvalidIdempotencyKey
from increment_service.validation.headers import idempotency_key
from tests.support.net import JSON

Client = TestClient[Any, Any]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        # Parameters after the string: parsed, ignored.
        ('"abc";p=1', "abc"),
        ('"abc";p', "abc"),  # no value: true
        ('"abc";p;q;r', "abc"),
        ('"abc";p=1;p=2', "abc"),  # a repeated name overwrites
        ('"abc"; p=1', "abc"),  # spaces after ";" (SP only)
        ('"abc";    p=1;  q=2', "abc"),
        ('"abc";*p=1', "abc"),
        ('"abc";a1_-.*=1', "abc"),
        ('"abc";p=0', "abc"),
        ('"abc";p=-1', "abc"),
        ('"abc";p=123456789012345', "abc"),  # 15 digits, the most an integer has
        ('"abc";p=-123456789012345', "abc"),
        ('"abc";p=1.5', "abc"),
        ('"abc";p=-0.001', "abc"),
        ('"abc";p=123456789012.123', "abc"),  # 12 digits, ".", 3 digits: the widest decimal
        ('"abc";p=007', "abc"),
        ('"abc";p="x"', "abc"),
        ('"abc";p=""', "abc"),
        ('"abc";p="with space; and = \\" \\\\"', "abc"),
        ('"abc";p=tok', "abc"),
        ('"abc";p=Tok/en:x*1', "abc"),
        ('"abc";p=*!#$%&\'+-.^_`|~', "abc"),
        ('"abc";p=:YWJj:', "abc"),
        ('"abc";p=:YQ==:', "abc"),
        ('"abc";p=:YQ:', "abc"),  # padding may be left out
        ('"abc";p=::', "abc"),
        ('"abc";p=?1', "abc"),
        ('"abc";p=?0', "abc"),
        ('"abc";a=1;b="2";c=tok;d=:YQ==:;e=?1;f', "abc"),
        ('"a;b=1";p=1', "a;b=1"),  # a ";" in the string is the key's
        ('"\\"q\\"";p=1', '"q"'),
        # The string alone, as before.
        ('"abc"', "abc"),
        ('"with-\\"escapes\\"-and-\\\\"', 'with-"escapes"-and-\\'),
        ('"' + "k" * 255 + '";p=1', "k" * 255),
        # The field's surrounding whitespace is not part of it.
        (' "abc";p=1 ', "abc"),
        ('\t"abc";p=1\t', "abc"),
        # A bare token is taken whole, as before: what looks like a parameter is key.
        ("abc;p=1", "abc;p=1"),
        ("abc;P=;;", "abc;P=;;"),
        ("abc", "abc"),
        ("k" * 255, "k" * 255),
    ],
)
def test_well_formed_keys(value: str, key: str) -> None:
    assert idempotency_key(value) == key


@pytest.mark.parametrize(
    "value",
    [
        # Nothing may come between the string and its ";": not even whitespace.
        '"abc" ;p=1',
        '"abc"\t;p=1',
        '"abc";p=1 ;q',
        '"abc"x',
        '"abc";p=1x',  # after an integer only ";" (or the end) may follow
        '"abc";p=1,q',  # an item, not a list
        '"abc""def"',
        # The name: a lowercase letter or "*" first, then lcalpha, DIGIT, "_", "-", ".", "*".
        '"abc";',
        '"abc";;p',
        '"abc"; ',
        '"abc";P=1',
        '"abc";1p=1',
        '"abc";_p=1',
        '"abc";-p=1',
        '"abc";=1',
        '"abc";p\t=1',
        '"abc";\tp=1',  # only SP may follow ";"
        '"abc";pA=1',
        '"abc";p =1',
        '"abc";p= 1',
        # The value: a bare item.
        '"abc";p=',
        '"abc";p=;q',
        '"abc";p=@1',
        '"abc";p=%"x"',
        '"abc";p=(1 2)',
        '"abc";p=.5',
        '"abc";p=-',
        '"abc";p=--1',
        '"abc";p=+1',
        '"abc";p=1234567890123456',  # 16 digits
        '"abc";p=1.',
        '"abc";p=1.2345',
        '"abc";p=1234567890123.1',  # 13 digits before "."
        '"abc";p=1.2.3',
        '"abc";p="unterminated',
        '"abc";p="bad \\escape"',
        '"abc";p="tab\tinside"',
        '"abc";p=\u00e9',
        '"abc";p=t\u00e9',
        '"abc";p=:YQ==',  # no closing ":"
        '"abc";p=:Y:',  # not base64
        '"abc";p=:Y.Q:',
        '"abc";p=:=YQ:',
        '"abc";p=?',
        '"abc";p=?2',
        '"abc";p=?true',
        '"abc";p=?1x',
        # The string itself, as before.
        '"unterminated',
        '"unterminated;p=1',
        '"bad \\escape";p=1',
        '"";p=1',
        '"a b";p=1',  # a string may hold a space; a key may not
        '"caf\u00e9";p=1',
        '"' + "k" * 256 + '";p=1',
        # A bare token, as before.
        "",
        "has space",
        "k" * 256,
        "caf\u00e9;p=1",
    ],
)
def test_malformed_keys_are_refused(value: str) -> None:
    with pytest.raises(InvalidIdempotencyKey) as refused:
        idempotency_key(value)
    assert refused.value.status == 400


def test_the_refusal_says_what_is_wrong() -> None:
    with pytest.raises(InvalidIdempotencyKey) as refused:
        idempotency_key('"abc";P=1')
    assert "parameters" in refused.value.detail
    assert "lowercase letter" in refused.value.detail


async def counters(pg: asyncpg.Connection) -> dict[str, int]:
    return {r["key"]: r["value"] for r in await pg.fetch("SELECT key, value FROM counters")}


async def post(client: Client, value: str, body: bytes = b'{"key": "h", "value": 1}') -> Any:
    return await client.post("/increment", data=body, headers={**JSON, "Idempotency-Key": value})


async def test_parameters_are_ignored_over_http(client: Client, pg: asyncpg.Connection) -> None:
    first = await post(client, '"param-key";p=1;q="x";r=?0')
    assert first.status == 202
    # The same key without parameters, or with others, is the same key: a replay.
    assert (await post(client, '"param-key"')).status == 202
    assert (await post(client, "param-key")).status == 202
    assert (await post(client, '"param-key"; z=:YQ==:')).status == 202
    # And another body under it is another request: it is the key, not the field, that
    # counts (409 while the first is not settled, 422 once it is).
    other = b'{"key": "h", "value": 2}'
    assert (await post(client, '"param-key";p=2', other)).status == 409
    assert await client.app[appkeys.WRITE_BEHIND].flush()
    refused = await post(client, '"param-key";p=2', other)
    assert refused.status == 422
    assert (await refused.json(content_type=None))["type"].endswith(":idempotency-key-reused")
    assert await counters(pg) == {"h": 1}
    rows = await pg.fetch("SELECT key FROM idempotency_keys")
    assert {r["key"] for r in rows} == {"param-key"}  # stored without its parameters


async def test_a_malformed_parameter_is_400_over_http(
    client: Client, pg: asyncpg.Connection
) -> None:
    response = await post(client, '"param-key" ;p=1')
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":invalid-idempotency-key")
    assert "parameter" in problem["detail"]
    batch = await client.post(
        "/increments",
        json={"increments": [{"key": "h", "value": 1}]},
        headers={"Idempotency-Key": '"param-key";p=?2'},
    )
    assert batch.status == 400
    assert await client.app[appkeys.WRITE_BEHIND].flush()
    assert await counters(pg) == {}
