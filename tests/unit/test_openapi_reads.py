"""openapi_reads.py in the document: the reads' limits are the validators' own, each at its
exact value and one past; the page's next is a string or null."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from increment_service.openapi import document
from increment_service.validation.increments import MAX_KEY_CHARS
from increment_service.validation.reads import (
    DEFAULT_PAGE_LIMIT,
    MAX_LOOKUP_BODY_BYTES,
    MAX_LOOKUP_KEYS,
    MAX_PAGE_LIMIT,
)

DOCUMENT = document()


def valid(schema_name: str, instance: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": DOCUMENT["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(instance)


@pytest.mark.parametrize(
    ("keys", "ok"),
    [
        ([], False),
        (["a"], True),
        (["a"] * MAX_LOOKUP_KEYS, True),
        (["a"] * (MAX_LOOKUP_KEYS + 1), False),
        (["k" * MAX_KEY_CHARS], True),
        (["k" * (MAX_KEY_CHARS + 1)], False),
        ([""], False),
        ([1], False),
    ],
)
def test_a_lookup_as_the_document_has_it(keys: list[Any], ok: bool) -> None:
    assert valid("CounterLookup", {"keys": keys}) is ok


def test_a_lookup_has_no_other_member() -> None:
    assert not valid("CounterLookup", {"keys": ["a"], "more": 1})
    assert not valid("CounterLookup", {})


def test_the_lookup_route_states_its_body_limit() -> None:
    post = DOCUMENT["paths"]["/api/counters/lookup"]["post"]
    assert post["requestBody"]["description"] == f"at most {MAX_LOOKUP_BODY_BYTES} bytes"
    assert set(post["responses"]) == {"200", "400", "401", "403", "413", "415", "422", "503"}


def test_the_listing_states_its_parameters() -> None:
    get = DOCUMENT["paths"]["/api/counters"]["get"]
    parameters = {p["name"]: p for p in get["parameters"]}
    assert set(parameters) == {"prefix", "after", "limit"}
    assert all(p["in"] == "query" and not p["required"] for p in parameters.values())
    limit = parameters["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (
        1,
        MAX_PAGE_LIMIT,
        DEFAULT_PAGE_LIMIT,
    )
    assert parameters["prefix"]["schema"]["maxLength"] == MAX_KEY_CHARS


@pytest.mark.parametrize(
    ("page", "ok"),
    [
        ({"counters": [], "next": None}, True),
        (
            {
                "counters": [{"key": "a", "value": 1, "updatedAt": "2026-12-05T00:00:00+00:00"}],
                "next": "a",
            },
            True,
        ),
        ({"counters": []}, False),
        ({"counters": [], "next": 1}, False),
    ],
)
def test_a_page_as_the_document_has_it(page: dict[str, Any], ok: bool) -> None:
    assert valid("CounterPage", page) is ok


def test_a_lookup_result_as_the_document_has_it() -> None:
    assert valid("CounterLookupResult", {"counters": [], "missing": ["a"]})
    assert not valid("CounterLookupResult", {"counters": []})
