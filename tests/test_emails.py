"""The normal form of email addresses (emails.email_key), without a server.

What the service does with it (uniqueness, login lookup, throttling) is tested end to end in
test_sessions.py and, for rows stored before it existed, in test_schema.py.
"""

from __future__ import annotations

import itertools
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from increment_service import emails

# (spelling, the same account's plain spelling)
SAME_ACCOUNT = [
    ("Ann@Example.COM", "ann@example.com"),
    ("\uff41nn@example.com", "ann@example.com"),  # fullwidth a
    ("\ufb01n@example.com", "fin@example.com"),  # the ligature fi
    ("e\u0301lise@example.com", "\u00e9lise@example.com"),  # NFD and NFC
    ("\u00c9LISE@example.com", "\u00e9lise@example.com"),
    ("stra\u00dfe@example.com", "strasse@example.com"),  # case folding, not lower(): ss
    ("STRASSE@example.com", "strasse@example.com"),
    ("\u212bngstr\u00f6m@example.com", "\u00e5ngstr\u00f6m@example.com"),  # ANGSTROM SIGN
]

REFUSED = [
    ("a\u200b@example.com", emails.HIDDEN_CHARACTERS),  # zero-width space, trailing the local part
    ("a@example.com\u200b", emails.HIDDEN_CHARACTERS),
    ("so\u00adft@example.com", emails.HIDDEN_CHARACTERS),  # soft hyphen
    ("a\u2060b@example.com", emails.HIDDEN_CHARACTERS),  # word joiner
    ("a\ufeff@example.com", emails.HIDDEN_CHARACTERS),  # zero-width no-break space
    ("a\u202e@example.com", emails.HIDDEN_CHARACTERS),  # right-to-left override
    ("a\u034f@example.com", emails.HIDDEN_CHARACTERS),  # combining grapheme joiner (Mn)
    ("a\u3164@example.com", emails.HIDDEN_CHARACTERS),  # Hangul filler (Lo)
    ("a\ufe0f@example.com", emails.HIDDEN_CHARACTERS),  # variation selector (Mn)
    ("a\U000e0041@example.com", emails.HIDDEN_CHARACTERS),  # tag letter A
    ("a\ue000@example.com", emails.HIDDEN_CHARACTERS),  # private use
    ("a\u0378@example.com", emails.HIDDEN_CHARACTERS),  # unassigned
    ("a\ud800@example.com", emails.HIDDEN_CHARACTERS),  # lone surrogate
    ("a\x00@example.com", emails.HIDDEN_CHARACTERS),
    ("a b@example.com", emails.HIDDEN_CHARACTERS),
    ("a\u00a0b@example.com", emails.HIDDEN_CHARACTERS),  # no-break space
    ("a\u00a8@example.com", emails.HIDDEN_CHARACTERS),  # diaeresis: NFKC makes it a space
    ("a\ufe6bb@example.com", emails.NOT_AN_ADDRESS),  # small commercial at: NFKC makes an @
    ("no-at-sign", emails.NOT_AN_ADDRESS),
    ("a@b", emails.NOT_AN_ADDRESS),
    ("a@@b.co", emails.NOT_AN_ADDRESS),
    ("x" * 250 + "@example.com", emails.NOT_AN_ADDRESS),
    # Fullwidth @: NFKC would make an address of it, but the address as written is none.
    ("\uff41\uff20example.com", emails.NOT_AN_ADDRESS),
    # 100 characters that NFKC expands 4-fold: the key would not fit the limit.
    ("\u3300" * 100 + "@x.co", emails.NOT_AN_ADDRESS),
    ("", emails.NOT_AN_ADDRESS),
]


@pytest.mark.parametrize(("spelling", "plain"), SAME_ACCOUNT)
def test_lookalike_spellings_have_one_key(spelling: str, plain: str) -> None:
    assert emails.email_key(spelling) == emails.email_key(plain) == plain


def test_dotted_capital_i_keeps_its_dot() -> None:
    """Full case folding maps U+0130 to i + U+0307, not to i (that is Turkish folding). So
    İia@x.co is its own account, and logins throttle it under its own key."""
    assert emails.email_key("\u0130ia@x.co") == "i\u0307ia@x.co"
    assert emails.email_key("i\u0307ia@x.co") == "i\u0307ia@x.co"
    assert emails.email_key("\u0130ia@x.co") != emails.email_key("iia@x.co")


@pytest.mark.parametrize(("address", "detail"), REFUSED)
def test_refused_addresses(address: str, detail: str) -> None:
    with pytest.raises(emails.InvalidEmail) as refused:
        emails.email_key(address)
    assert str(refused.value) == detail


@given(st.text(max_size=40))
def test_any_text_gets_a_key_or_invalid_email_and_keys_are_fixed_points(text: str) -> None:
    for address in (text, text + "@example.com", "a@" + text + ".co"):
        try:
            key = emails.email_key(address)
        except emails.InvalidEmail:
            continue
        assert emails.email_key(key) == key
        assert not any(emails.refused(char) for char in key)


def test_default_ignorable_lookup_at_the_edges_of_every_range() -> None:
    ranges = emails.DEFAULT_IGNORABLE
    # Sorted, and neither overlapping nor touching (touching ranges are written as one).
    assert all(a_last + 1 < b_first for (_, a_last), (b_first, _) in itertools.pairwise(ranges))
    for first, last in ranges:
        assert first <= last
        assert emails.default_ignorable(chr(first))
        assert emails.default_ignorable(chr(last))
        assert not emails.default_ignorable(chr(first - 1))
        assert not emails.default_ignorable(chr(last + 1))
    assert not emails.default_ignorable("\x00")


def test_every_listed_code_point_has_a_category_the_property_allows() -> None:
    """unicodedata has no Default_Ignorable_Code_Point to compare with, but it can tell a typo
    in the list: every such code point is a format character, a nonspacing mark, a filler
    letter or unassigned."""
    for first, last in emails.DEFAULT_IGNORABLE:
        for code in range(first, last + 1):
            assert unicodedata.category(chr(code)) in {"Cf", "Mn", "Lo", "Cn"}, hex(code)


def test_visible_part_drops_only_what_cannot_be_seen() -> None:
    assert emails.visible_part("b\u200bo\u00adb\u034f@x.co\ufeff") == "bob@x.co"
    assert emails.visible_part("\u00e9l\u00efse@x.co") == "\u00e9l\u00efse@x.co"
    assert emails.visible_part("a\ue000@x.co") == "a\ue000@x.co"  # visible, yet still refused


def test_visible_part_drops_format_characters_that_are_not_default_ignorable() -> None:
    # U+0600 ARABIC NUMBER SIGN: category Cf, yet not Default_Ignorable_Code_Point.
    assert unicodedata.category("\u0600") == "Cf"
    assert not emails.default_ignorable("\u0600")
    assert emails.visible_part("a\u0600b@x.co") == "ab@x.co"


def test_an_address_of_exactly_254_characters_and_one_more() -> None:
    assert emails.MAX_EMAIL_CHARS == 254
    exact = "a" * (254 - len("@example.com")) + "@example.com"
    assert emails.email_key(exact) == exact
    with pytest.raises(emails.InvalidEmail, match=emails.NOT_AN_ADDRESS):
        emails.email_key("a" + exact)
