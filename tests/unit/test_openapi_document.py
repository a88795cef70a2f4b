"""openapi.py alone: the document is valid JSON Schema where it holds schemas, every reference
resolves, and its limits are the validators' own, each at its exact value and one past. (That
it names exactly the routes the app serves is tests/test_api.py.)"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from increment_service.emails import MAX_EMAIL_CHARS
from increment_service.openapi import document
from increment_service.validation.increments import MAX_BATCH_ITEMS, MAX_KEY_CHARS

DOCUMENT = document()
SAFE = 2**53 - 1


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def valid(schema_name: str, instance: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": DOCUMENT["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(instance)


def test_every_reference_resolves() -> None:
    found = refs(DOCUMENT)
    assert found
    for ref in found:
        node: Any = DOCUMENT
        assert ref.startswith("#/")
        for part in ref[2:].split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_every_schema_is_json_schema_and_every_operation_named_once() -> None:
    for schema in DOCUMENT["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    ids = [op["operationId"] for path in DOCUMENT["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert DOCUMENT["openapi"] == "3.1.0"


@pytest.mark.parametrize(
    ("instance", "ok"),
    [
        ({"key": "k" * MAX_KEY_CHARS, "value": SAFE}, True),
        ({"key": "k" * (MAX_KEY_CHARS + 1), "value": 1}, False),
        ({"key": "", "value": 1}, False),
        ({"key": "a", "value": -SAFE}, True),
        ({"key": "a", "value": SAFE + 1}, False),
        ({"key": "a", "value": -SAFE - 1}, False),
        ({"key": "a", "value": 1, "x": 1}, False),
        ({"key": "a"}, False),
    ],
)
def test_an_increment_as_the_document_has_it(instance: Any, ok: bool) -> None:
    assert valid("Increment", instance) is ok


@pytest.mark.parametrize(("items", "ok"), [(0, False), (1, True), (1000, True), (1001, False)])
def test_a_batch_as_the_document_has_it(items: int, ok: bool) -> None:
    assert MAX_BATCH_ITEMS == 1000
    batch = {"increments": [{"key": "a", "value": 1}] * items}
    assert valid("Increments", batch) is ok


@pytest.mark.parametrize(("length", "ok"), [(MAX_EMAIL_CHARS, True), (MAX_EMAIL_CHARS + 1, False)])
def test_a_new_user_as_the_document_has_it(length: int, ok: bool) -> None:
    email = "a" * (length - len("@example.com")) + "@example.com"
    assert valid("NewUser", {"email": email, "password": "p" * 8}) is ok


def test_every_route_that_takes_a_token_names_both_schemes_and_every_401_a_challenge() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    scopes = {}
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            security = operation.get("security", [])
            bearer = [s["bearer"] for s in security if "bearer" in s]
            if bearer:
                assert {"session": []} in security, (method, path)
                assert "403" in operation["responses"], (method, path)
                scopes[(method, path)] = bearer[0]
            if "401" in operation["responses"]:
                assert operation["responses"]["401"] == {
                    "$ref": "#/components/responses/Unauthorized"
                }, (method, path)
    assert scopes == {
        ("post", "/increment"): ["increment"],
        ("post", "/increments"): ["increment"],
        ("post", "/api/increment"): ["increment"],
        ("post", "/api/increments"): ["increment"],
        ("get", "/api/counters/{key}"): ["read"],
        ("get", "/api/counters"): ["read"],
        ("post", "/api/counters/lookup"): ["read"],
    }
    unauthorized = DOCUMENT["components"]["responses"]["Unauthorized"]
    assert unauthorized["headers"]["WWW-Authenticate"]["required"] is True
    # Building the document twice gives the same document (nothing shared is changed).
    assert document() == DOCUMENT


@pytest.mark.parametrize(
    ("instance", "ok"),
    [
        ({"name": "n", "scopes": ["read"]}, True),
        ({"name": "n" * 100, "scopes": ["read", "increment"], "expiresInSeconds": 60}, True),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": None}, True),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 31_536_000}, True),
        ({"name": "n" * 101, "scopes": ["read"]}, False),
        ({"name": "", "scopes": ["read"]}, False),
        ({"name": "n", "scopes": []}, False),
        ({"name": "n", "scopes": ["read", "read"]}, False),
        ({"name": "n", "scopes": ["write"]}, False),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 59}, False),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 31_536_001}, False),
        ({"name": "n", "scopes": ["read"], "x": 1}, False),
    ],
)
def test_a_new_token_as_the_document_has_it(instance: Any, ok: bool) -> None:
    assert valid("NewToken", instance) is ok
