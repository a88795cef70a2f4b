"""validation/headers.py alone: Idempotency-Key (a bare token or an RFC 8941 string with
parameters) at its exact length limit and one past, and Prefer."""

from __future__ import annotations

import pytest

from increment_service.errors import InvalidIdempotencyKey
from increment_service.validation.headers import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    idempotency_key,
    preferences,
    prefers_durable,
    prefers_representation,
    read_idempotency_key,
)
from tests.unit.requests import request

RULE = (
    "the Idempotency-Key must be 1 to 255 visible ASCII characters, bare or as a"
    ' structured-field string ("...") with optional parameters (;name=value)'
)


def test_the_limit() -> None:
    assert MAX_IDEMPOTENCY_KEY_CHARS == 255


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("a", "a"),
        ("k" * 255, "k" * 255),
        ("!~", "!~"),
        (" \tabc\t ", "abc"),
        ("abc;p=1", "abc;p=1"),  # bare: a ";" is part of the key
        ("XkeyX", "XkeyX"),
        ('"a~b"', "a~b"),
        ('"abc";p=-1', "abc"),
        ('"abc";p=a', "abc"),
        ('"abc";p=a;q=1', "abc"),
        ('"abc";p=:YQ==:;q=:YWI=:', "abc"),
        ('"abc"', "abc"),
        ('"' + "k" * 255 + '"', "k" * 255),
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ('"abc";p=1', "abc"),
        ('"abc";p', "abc"),
        ('"abc"; p=1', "abc"),
        ('"abc";p=1;q=2;*r', "abc"),
        ('"abc";p=-12', "abc"),
        ('"abc";p=123456789012345', "abc"),
        ('"abc";p=123456789012.123', "abc"),
        ('"abc";p=1.5', "abc"),
        ('"abc";p="x y"', "abc"),
        ('"abc";p=tok:/en', "abc"),
        ('"abc";p=*tok', "abc"),
        ('"abc";p=:YWJj:', "abc"),
        ('"abc";p=:YWI:', "abc"),  # padding left out
        ('"abc";p=::', "abc"),
        ('"abc";p=?0;q=?1', "abc"),
        ('"abc";a-b_c.d*9=1', "abc"),
    ],
)
def test_keys_taken(value: str, key: str) -> None:
    assert idempotency_key(value) == key


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", ""),
        (" ", ""),
        (" \x0cabc", ""),  # only spaces and tabs surround a field value
        ("abc\x0b", ""),
        ("k" * 256, ""),
        ("a b", ""),
        ("\u00e9", ""),
        ("a\x7f", ""),
        ('""', ""),
        ('"' + "k" * 256 + '"', ""),
        ('"a b"', ""),  # a space: in an sf-string, but not in a key
        ('"abc', ": the string has no closing '\"'"),
        ('"a\\nb"', ': only \\" and \\\\ are escapes in a string'),
        ('"a\\', ': only \\" and \\\\ are escapes in a string'),
        ('"a\u00e9"', ": '\u00e9' cannot be in a string"),
        ('"a\x7f"', ": '\\x7f' cannot be in a string"),
        ('"abc" ', ""),  # stripped: taken (see below)
        ('"abc";', ": a parameter's name must start with a lowercase letter or '*'"),
        ('"abc";P=1', ": a parameter's name must start with a lowercase letter or '*'"),
        ('"abc";1=1', ": a parameter's name must start with a lowercase letter or '*'"),
        ('"abc" ;p=1', ": ' ' cannot follow the string or a parameter"),
        ('"abc"x', ": 'x' cannot follow the string or a parameter"),
        ('"abc";p=1x', ": 'x' cannot follow the string or a parameter"),
        (
            '"abc";p=',
            ": a parameter's value must be a number, a string, a token, a byte sequence or ?0/?1",
        ),
        (
            '"abc";p=@',
            ": a parameter's value must be a number, a string, a token, a byte sequence or ?0/?1",
        ),
        ('"abc";p=-', ": a number must have a digit after its sign"),
        ('"abc";p=-a', ": a number must have a digit after its sign"),
        ('"abc";p=1234567890123456', ": a number has at most 15 digits (a decimal 12 and 3)"),
        ('"abc";p=1234567890123.1', ": a decimal has at most 12 digits before its '.'"),
        ('"abc";p=1.1234', ": a decimal has 1 to 3 digits after its '.'"),
        ('"abc";p=123456789012.1234', ": a number has at most 15 digits (a decimal 12 and 3)"),
        ('"abc";p=1.', ": a decimal has 1 to 3 digits after its '.'"),
        ('"abc";p=1.2.3', ": '.' cannot follow the string or a parameter"),
        ('"abc";p=:YWJj', ": a byte sequence has no closing ':'"),
        ('"abc";p=:YW!j:', ": a byte sequence holds base64 only"),
        ('"abc";p=:Y:', ": a byte sequence is not valid base64"),
        ('"abc";p=:YQ==YQ==:', ": a byte sequence is not valid base64"),
        ('"abc";p=?2', ": a boolean is ?0 or ?1"),
        ('"abc";p=?', ": a boolean is ?0 or ?1"),
        ('"abc";p="x', ": the string has no closing '\"'"),
    ],
)
def test_keys_refused_say_why(value: str, why: str) -> None:
    if value == '"abc" ':
        assert idempotency_key(value) == "abc"
        return
    with pytest.raises(InvalidIdempotencyKey) as refused:
        idempotency_key(value)
    assert refused.value.status == 400
    assert refused.value.detail == RULE + why


def test_a_decimal_of_12_and_3_digits_is_the_longest() -> None:
    assert idempotency_key('"k";p=-123456789012.123') == "k"
    assert idempotency_key('"k";p=123456789012345;q=1') == "k"


async def test_the_header_is_read_once_and_only_once() -> None:
    assert read_idempotency_key(request(b"{}")) is None
    assert read_idempotency_key(request(b"{}", [("Idempotency-Key", '"abc";x')])) == "abc"
    with pytest.raises(InvalidIdempotencyKey, match=r"^send one Idempotency-Key$"):
        read_idempotency_key(request(b"{}", [("Idempotency-Key", "a"), ("Idempotency-Key", "a")]))
    with pytest.raises(InvalidIdempotencyKey):
        read_idempotency_key(request(b"{}", [("Idempotency-Key", "")]))


@pytest.mark.parametrize(
    ("values", "durable"),
    [
        ([], False),
        (["durable"], True),
        (["DURABLE"], True),
        (["respond-async, durable"], True),
        (["respond-async", " Durable ;x=1"], True),
        (["durable=yes"], True),
        (["durable,respond-async"], True),
        (['durable="a=b"'], True),
        (["durable; a=1; b"], True),
        (["wait=5", "return=minimal"], False),
        (["durables"], False),
        (["x;durable"], False),
        ([""], False),
    ],
)
async def test_prefer_durable(values: list[str], durable: bool) -> None:
    assert prefers_durable(request(b"{}", [("Prefer", v) for v in values])) is durable


@pytest.mark.parametrize(
    ("values", "representation"),
    [
        ([], False),
        (["durable, return=representation"], True),
        (["durable", "return=representation"], True),
        (["Return = Representation ; x=1"], True),
        (['return="representation"'], True),
        (["return=minimal"], False),
        (["return=minimal, return=representation"], False),  # the first of a name counts
        (["return"], False),
        (["returns=representation"], False),
        (["x;return=representation"], False),
        (["representation"], False),
        (["return=Xrepresentation"], False),  # only quotes and spaces are taken off
    ],
)
async def test_prefer_return_representation(values: list[str], representation: bool) -> None:
    got = prefers_representation(request(b"{}", [("Prefer", v) for v in values]))
    assert got is representation


async def test_preferences_are_read_once_per_name_with_their_values() -> None:
    found = preferences(request(b"{}", [("Prefer", 'Durable, wait=5; x, return="minimal"')]))
    assert found == {"durable": "", "wait": "5", "return": "minimal"}
