"""tokens/format.py alone: what a token looks like, its checksum and its digest."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from increment_service.tokens.format import (
    ALPHABET,
    PREFIX,
    TOKEN_CHARS,
    base62,
    checksum,
    digest,
    new_token,
    well_formed,
)


def test_base62_is_fixed_width_and_exact() -> None:
    assert len(ALPHABET) == 62
    assert len(set(ALPHABET)) == 62
    assert base62(0, 6) == "000000"
    assert base62(61, 6) == "00000z"
    assert base62(62, 6) == "000010"
    assert base62(2**32 - 1, 6) == "4gfFC3"
    assert 62**6 > 2**32


def test_a_new_token_is_well_formed_and_new() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert len(token) == TOKEN_CHARS == 43
        assert token.startswith(PREFIX)
        assert set(token[len(PREFIX) :]) <= set(ALPHABET)
        assert token[-6:] == base62(zlib.crc32(token[:-6].encode()), 6)
        assert well_formed(token)


def test_every_single_character_change_is_caught() -> None:
    token = new_token()
    for at in range(len(PREFIX), TOKEN_CHARS):
        for other in "0aZ":
            changed = token[:at] + other + token[at + 1 :]
            assert well_formed(changed) is (changed == token), (at, other)


@pytest.mark.parametrize(
    "token",
    [
        "",
        PREFIX,
        "ghp_" + "0" * 38,
        PREFIX + "0" * 32 + checksum(PREFIX + "0" * 32) + "0",
        (PREFIX + "0" * 32 + checksum(PREFIX + "0" * 32))[:-1],
        PREFIX + "-" * 32 + checksum(PREFIX + "-" * 32),
        PREFIX + "\u00e9" * 32 + "000000",
        "ISVC_" + "0" * 32 + checksum("ISVC_" + "0" * 32),
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert not well_formed(token)


def test_a_made_up_token_with_the_right_checksum_is_well_formed() -> None:
    body = PREFIX + "1" * 32
    assert well_formed(body + checksum(body)), "the checksum is public: the verifier bounds floods"


def test_the_digest_is_sha256_of_the_token() -> None:
    token = new_token()
    assert digest(token) == hashlib.sha256(token.encode()).digest()
    assert len(digest(token)) == 32
