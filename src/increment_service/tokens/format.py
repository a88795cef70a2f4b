"""The token format: what a token looks like, made, checked and stored (pure; no I/O).

``isvc_`` + 32 random base62 characters (190 bits from ``secrets``) + 6 base62 characters of
the CRC32 of the prefix and the random part: 43 characters. The prefix lets secret scanners
find a leaked token; the checksum refuses a mistyped or made-up token without a database
lookup. (The format is public, so the checksum is no secret: a flood of well-formed bad tokens
is the verifier's to bound, not this module's.) Only the SHA-256 of a token is stored: a
secret of 190 random bits needs no slow hash.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

PREFIX = "isvc_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 32  # 32 * log2(62) = 190.5 bits
CHECKSUM_CHARS = 6  # 62**6 > 2**32: any CRC32 fits
TOKEN_CHARS = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS

_ALLOWED = frozenset(ALPHABET)


def base62(number: int, width: int) -> str:
    """``number`` in base62, left-padded with zeros to ``width`` characters."""
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits)).rjust(width, ALPHABET[0])


def checksum(body: str) -> str:
    """The checksum characters of a token's prefix and random part."""
    return base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def new_token() -> str:
    body = PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return body + checksum(body)


def well_formed(token: str) -> bool:
    """The token has the format and its checksum is right (no lookup needed to say no)."""
    if len(token) != TOKEN_CHARS or not token.startswith(PREFIX):
        return False
    body, given = token[:-CHECKSUM_CHARS], token[-CHECKSUM_CHARS:]
    if not _ALLOWED.issuperset(token[len(PREFIX) :]):
        return False
    return checksum(body) == given


def digest(token: str) -> bytes:
    """What is stored and looked up: the SHA-256 of the token."""
    return hashlib.sha256(token.encode("ascii")).digest()
