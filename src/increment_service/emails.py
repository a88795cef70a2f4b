"""Email addresses: which ones an account may have, and the one normal form they are known by.

``email_key`` is the only place that computes the normal form (the *email key*). The key is
stored in the unique column ``users.email_key`` and is what account creation, login lookup and
the login throttle all use, so two spellings that reach the same account also share one
throttle budget, and two spellings that could be mistaken for each other are one account.

The form is NFKC, then Unicode full case folding, then NFKC again (folding can leave a string
that is no longer NFKC). NFKC merges compatibility variants (fullwidth letters, the ligature
``ﬁ``) and canonical ones (``é`` as one code point or as ``e`` plus a combining accent); case
folding merges letter cases, including those ``lower()`` misses (``ß`` and ``ss``). Neither
removes what cannot be seen, so addresses with invisible characters are refused outright (see
``refused``) rather than silently cleaned.
"""

from __future__ import annotations

import bisect
import re
import unicodedata

MAX_EMAIL_CHARS = 254  # RFC 5321 path limit

#: Default_Ignorable_Code_Point, as inclusive ranges, from Unicode 14.0's
#: DerivedCoreProperties.txt (https://www.unicode.org/Public/14.0.0/ucd/DerivedCoreProperties.txt),
#: the Unicode version of Python 3.11's unicodedata, which has no such property. Most are of
#: category Cf (refused anyway); the rest are marks, fillers and reserved code points that render
#: as nothing (U+034F, U+115F, U+3164, variation selectors, ...).
DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_IGNORABLE_STARTS = [first for first, _ in DEFAULT_IGNORABLE]

# Local part, @, domain with at least one dot. Deliverability is the mail server's business.
_SHAPE = re.compile(r"[^@]+@[^@]+\.[^@]+")

NOT_AN_ADDRESS = "must be an email address"
HIDDEN_CHARACTERS = (
    "must not contain spaces, control, formatting, invisible, private-use or unassigned characters"
)


class InvalidEmail(ValueError):
    """Not an address an account may have; the message is the detail a client is shown."""


def default_ignorable(char: str) -> bool:
    code = ord(char)
    at = bisect.bisect_right(_IGNORABLE_STARTS, code) - 1
    return at >= 0 and code <= DEFAULT_IGNORABLE[at][1]


def refused(char: str) -> bool:
    """Characters no address may hold: general categories C (control, format, surrogate,
    private use, unassigned) and Z (spaces and separators), and the default-ignorable code
    points. Unassigned ones also keep the key stable: Unicode guarantees that normalization and
    case folding of *assigned* characters never change, so a newer Python cannot move a key."""
    return unicodedata.category(char)[0] in "CZ" or default_ignorable(char)


def email_key(address: str) -> str:
    """The normal form of ``address``, or InvalidEmail if no account may have it.

    Both the address as given and its normal form must look like an address and hold no
    refused character: NFKC can turn a harmless character into a refused or structural one
    (U+FE6B SMALL COMMERCIAL AT becomes ``@``).
    """
    _check(address)
    key = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", address).casefold())
    _check(key)
    return key


def _check(text: str) -> None:
    if any(refused(char) for char in text):
        raise InvalidEmail(HIDDEN_CHARACTERS)
    # The key's length is bounded too: NFKC may expand a character up to 18-fold, and the key
    # goes into a btree index.
    if len(text) > MAX_EMAIL_CHARS or not _SHAPE.fullmatch(text):
        raise InvalidEmail(NOT_AN_ADDRESS)


def visible_part(address: str) -> str:
    """``address`` without its format and default-ignorable characters: what a reader sees.

    Only for addresses stored before those were refused (migration 0003 keys them by what
    they look like); new addresses with such characters are refused, never cleaned.
    """
    return "".join(
        char
        for char in address
        if unicodedata.category(char) != "Cf" and not default_ignorable(char)
    )
