"""API tokens end to end, against real Postgres and Redis: made, listed, revoked, and the
answers of every route that takes them (RFC 6750 refusals, scopes, INCREMENT_AUTH)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys
from increment_service.app import create_app
from increment_service.settings import Settings
from increment_service.tokens import MAX_LIVE_TOKENS, well_formed
from increment_service.tokens.format import PREFIX, TOKEN_CHARS, checksum
from tests.support.inprocess import Client
from tests.support.metrics import metric_value
from tests.support.problems import assert_problem, problem_type
from tests.support.tokens import bearer, made, signed_up

CHALLENGE = 'Bearer realm="increment-service"'
INCREMENT = {"key": "k", "value": 1}


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    return await aiohttp_client(create_app(settings), cookie_jar=aiohttp.DummyCookieJar())


async def lookups(client: Client) -> float:
    text = await (await client.get("/metrics")).text()
    return metric_value(text, "increment_token_lookups_total") or 0.0


def error_of(response: aiohttp.ClientResponse) -> str | None:
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith(CHALLENGE)
    for part in challenge.split(", "):
        if part.startswith("error="):
            return part.removeprefix("error=").strip('"')
    return None


# --- made, listed, revoked ----------------------------------------------------------------


async def test_a_token_is_made_shown_once_listed_without_its_secret_and_revoked(
    api: Client,
) -> None:
    _, cookie = await signed_up(api)
    response = await api.post(
        "/api/tokens",
        json={"name": "deploy bot", "scopes": ["read", "increment"], "expiresInSeconds": 3600},
        headers=cookie,
    )
    assert response.status == 201, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert set(body) == {"id", "name", "scopes", "token", "createdAt", "expiresAt"}
    assert body["name"] == "deploy bot"
    assert body["scopes"] == ["increment", "read"]
    token = body["token"]
    assert token.startswith(PREFIX)
    assert len(token) == TOKEN_CHARS
    assert well_formed(token)
    created = datetime.datetime.fromisoformat(body["createdAt"])
    expires = datetime.datetime.fromisoformat(body["expiresAt"])
    assert expires - created == datetime.timedelta(seconds=3600)

    forever = await made(api, cookie, ["read"], name="reader")
    assert forever["expiresAt"] is None
    assert forever["token"] != token

    listed = await api.get("/api/tokens", headers=cookie)
    assert listed.status == 200
    tokens = (await listed.json())["tokens"]
    assert [t["id"] for t in tokens] == [body["id"], forever["id"]]
    assert set(tokens[0]) == {"id", "name", "scopes", "createdAt", "expiresAt", "lastUsedAt"}
    assert tokens[0]["lastUsedAt"] is None
    assert token not in await listed.text()

    # Used, then the usage written (in batches, not per request): lastUsedAt is set.
    assert (await api.post("/api/increment", json=INCREMENT, headers=bearer(token))).status == 202
    assert await api.app[appkeys.TOKENS].usage.write()
    tokens = (await (await api.get("/api/tokens", headers=cookie)).json())["tokens"]
    assert tokens[0]["lastUsedAt"] is not None
    assert tokens[1]["lastUsedAt"] is None

    assert (await api.delete(f"/api/tokens/{body['id']}", headers=cookie)).status == 204
    refused = await api.post("/api/increment", json=INCREMENT, headers=bearer(token))
    await assert_problem(refused, 401)
    assert error_of(refused) == "invalid_token"
    await assert_problem(await api.delete(f"/api/tokens/{body['id']}", headers=cookie), 404)
    tokens = (await (await api.get("/api/tokens", headers=cookie)).json())["tokens"]
    assert [t["id"] for t in tokens] == [forever["id"]]


async def test_another_users_token_and_strange_ids_are_404(api: Client) -> None:
    _, alice = await signed_up(api)
    _, bob = await signed_up(api)
    token = await made(api, alice)
    await assert_problem(await api.delete(f"/api/tokens/{token['id']}", headers=bob), 404)
    for strange in (uuid.uuid4(), "not-a-uuid", "%00", "1" * 300):
        await assert_problem(await api.delete(f"/api/tokens/{strange}", headers=alice), 404)
    assert (await api.get("/api/tokens", headers=bob)).status == 200
    assert (await (await api.get("/api/tokens", headers=bob)).json()) == {"tokens": []}
    # Alice's token still works.
    assert (await api.get("/api/counters/x", headers=bearer(token["token"]))).status == 404


@pytest.mark.parametrize(
    ("body", "pointers"),
    [
        ({}, ["/name", "/scopes"]),
        ({"name": "", "scopes": ["read"]}, ["/name"]),
        ({"name": "n" * 101, "scopes": ["read"]}, ["/name"]),
        ({"name": "a\x00b", "scopes": ["read"]}, ["/name"]),
        ({"name": 5, "scopes": ["read"]}, ["/name"]),
        ({"name": "n", "scopes": []}, ["/scopes"]),
        ({"name": "n", "scopes": "read"}, ["/scopes"]),
        ({"name": "n", "scopes": ["write"]}, ["/scopes"]),
        ({"name": "n", "scopes": ["read", "read"]}, ["/scopes"]),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 59}, ["/expiresInSeconds"]),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 31_536_001}, ["/expiresInSeconds"]),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": 60.0}, ["/expiresInSeconds"]),
        ({"name": "n", "scopes": ["read"], "expiresInSeconds": True}, ["/expiresInSeconds"]),
        ({"name": "n", "scopes": ["read"], "extra": 1}, ["/extra"]),
    ],
)
async def test_bad_token_bodies_are_422(
    api: Client, body: dict[str, Any], pointers: list[str]
) -> None:
    _, cookie = await signed_up(api)
    response = await api.post("/api/tokens", json=body, headers=cookie)
    await assert_problem(response, 422, pointers)


async def test_token_bodies_follow_the_json_rules(api: Client) -> None:
    _, cookie = await signed_up(api)
    for data, status in ((b"{", 400), (b"[]", 422), (b'{"name":"a","name":"b"}', 400)):
        response = await api.post(
            "/api/tokens", data=data, headers={**cookie, "Content-Type": "application/json"}
        )
        await assert_problem(response, status)
    await assert_problem(await api.post("/api/tokens", data=b"{}", headers=cookie), 415)
    big = {"name": "n", "scopes": ["read"], "pad": "x" * 5000}
    await assert_problem(await api.post("/api/tokens", json=big, headers=cookie), 413)
    for name, expires in (("n" * 100, 60), ("n", 31_536_000), ("n", None)):
        body = {"name": name, "scopes": ["read"], "expiresInSeconds": expires}
        assert (await api.post("/api/tokens", json=body, headers=cookie)).status == 201


async def test_tokens_are_managed_with_a_session_never_with_a_token(api: Client) -> None:
    _, cookie = await signed_up(api)
    token = (await made(api, cookie))["token"]
    for method, path in (("GET", "/api/tokens"), ("POST", "/api/tokens")):
        response = await api.request(method, path, json={}, headers=bearer(token))
        await assert_problem(response, 403)
        assert await problem_type(response) == "token-not-allowed"
        # A token decides even beside a session's cookie.
        both = await api.request(method, path, json={}, headers={**cookie, **bearer(token)})
        assert both.status == 403
        nobody = await api.request(method, path, json={})
        await assert_problem(nobody, 401)
        assert nobody.headers["WWW-Authenticate"] == CHALLENGE
    response = await api.delete(f"/api/tokens/{uuid.uuid4()}", headers=bearer(token))
    assert await problem_type(response) == "token-not-allowed"


async def test_the_cap_on_live_tokens_is_409_and_expired_ones_do_not_count(
    api: Client, pg: asyncpg.Connection
) -> None:
    user_id, cookie = await signed_up(api)
    await pg.executemany(
        "INSERT INTO api_tokens (id, user_id, name, scopes, token_sha256)"
        " VALUES ($1, $2, 'filler', '{read}', $3)",
        [
            (uuid.uuid4(), uuid.UUID(user_id), uuid.uuid4().bytes)
            for _ in range(MAX_LIVE_TOKENS - 1)
        ],
    )
    last = await made(api, cookie)
    response = await api.post("/api/tokens", json={"name": "n", "scopes": ["read"]}, headers=cookie)
    await assert_problem(response, 409)
    assert await problem_type(response) == "too-many-tokens"
    await pg.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 s' WHERE id = $1",
        uuid.UUID(last["id"]),
    )
    await made(api, cookie)
    # Another user has a cap of their own.
    _, other = await signed_up(api)
    await made(api, other)


# --- the routes that take tokens ------------------------------------------------------------


async def test_refusals_as_rfc_6750_has_them(api: Client) -> None:
    _, cookie = await signed_up(api)
    reader = (await made(api, cookie, ["read"]))["token"]
    writer = (await made(api, cookie, ["increment"]))["token"]
    before = await lookups(api)

    nothing = await api.post("/api/increment", json=INCREMENT)
    await assert_problem(nothing, 401)
    assert nothing.headers["WWW-Authenticate"] == CHALLENGE, "no error code without credentials"

    mistyped = writer[:-1] + ("A" if writer[-1] != "A" else "B")
    body = writer[len(PREFIX) : -6]
    wrong = [
        mistyped,
        writer.upper(),
        "isvc_" + "0" * 32 + checksum("isvc_" + "1" * 32),
        writer + "x",
        "ghp_" + writer[4:],
        "",
        "not base64 at all!",
        body,
    ]
    for token in wrong:
        response = await api.post("/api/increment", json=INCREMENT, headers=bearer(token))
        await assert_problem(response, 401)
        assert error_of(response) == "invalid_token", token
        assert await problem_type(response) == "invalid-token"
    assert await lookups(api) == before, "a malformed token is refused without a lookup"

    unknown = "isvc_" + "1" * 32
    unknown += checksum(unknown)
    response = await api.get("/api/counters/k", headers=bearer(unknown))
    assert error_of(response) == "invalid_token"
    assert await lookups(api) == before + 1
    response = await api.get("/api/counters/k", headers=bearer(unknown))
    assert error_of(response) == "invalid_token"
    assert await lookups(api) == before + 1, "an unknown token is remembered"

    scope = await api.get("/api/counters/k", headers=bearer(writer))
    await assert_problem(scope, 403)
    assert error_of(scope) == "insufficient_scope"
    assert 'scope="read"' in scope.headers["WWW-Authenticate"]
    scope = await api.post(
        "/api/increments", json={"increments": [INCREMENT]}, headers=bearer(reader)
    )
    assert error_of(scope) == "insufficient_scope"

    # The token decides, even beside a valid session cookie.
    both = await api.post("/api/increment", json=INCREMENT, headers={**cookie, **bearer(reader)})
    assert both.status == 403
    assert (await api.post("/api/increment", json=INCREMENT, headers=cookie)).status == 202
    assert (await api.post("/api/increment", json=INCREMENT, headers=bearer(writer))).status == 202
    assert (await api.get("/api/counters/none", headers=bearer(reader))).status == 404
    # Another scheme is no bearer token: the cookie decides.
    basic = {**cookie, "Authorization": "Basic dTpw"}
    assert (await api.post("/api/increment", json=INCREMENT, headers=basic)).status == 202

    text = await (await api.get("/metrics")).text()
    assert metric_value(text, 'increment_token_refusals_total{reason="malformed"}') == len(wrong)
    assert metric_value(text, 'increment_token_refusals_total{reason="unknown"}') == 2
    assert metric_value(text, 'increment_token_refusals_total{reason="scope"}') == 3
    assert (metric_value(text, 'increment_token_checks_total{result="hit"}') or 0) >= 1


async def test_a_token_in_the_query_string_is_refused(api: Client) -> None:
    _, cookie = await signed_up(api)
    token = (await made(api, cookie))["token"]
    for path in (f"/api/counters/k?access_token={token}", f"/api/tokens?access_token={token}"):
        response = await api.get(path, headers=cookie)
        await assert_problem(response, 400)
        assert await problem_type(response) == "token-in-query"
    response = await api.post(f"/api/increment?access_token={token}", json=INCREMENT)
    assert response.status == 400
    assert error_of(response) == "invalid_request"


async def test_every_401_carries_a_challenge(api: Client) -> None:
    account = {"email": "nobody@example.com", "password": "wrong password"}
    for response in (
        await api.get("/api/sessions"),
        await api.post("/api/sessions", json=account),
        await api.get("/api/counters/k"),
        await api.post("/api/increments", json={"increments": [INCREMENT]}),
        await api.get("/api/tokens"),
    ):
        await assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"] == CHALLENGE


@pytest.mark.parametrize("auth", ["session", "token"])
async def test_increment_auth_guards_the_open_routes(
    aiohttp_client: AiohttpClient, settings: Settings, auth: str
) -> None:
    api = await aiohttp_client(
        create_app(dataclasses.replace(settings, increment_auth=auth)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    _, cookie = await signed_up(api)
    token = (await made(api, cookie))["token"]
    reader = (await made(api, cookie, ["read"]))["token"]
    batch = {"increments": [INCREMENT]}
    for path, body in (("/increment", INCREMENT), ("/increments", batch)):
        nothing = await api.post(path, json=body)
        await assert_problem(nothing, 401)
        assert nothing.headers["WWW-Authenticate"] == CHALLENGE
        assert (await api.post(path, json=body, headers=bearer(token))).status == 202
        assert (await api.post(path, json=body, headers=bearer(reader))).status == 403
        with_cookie = await api.post(path, json=body, headers=cookie)
        assert with_cookie.status == (202 if auth == "session" else 401)


@pytest.fixture
async def person(api: Client) -> dict[str, str]:
    """A session's Cookie header (one sign-up per test, shared by its examples)."""
    return (await signed_up(api))[1]


_HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
    max_size=60,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    authorization=st.one_of(_HEADER_TEXT, _HEADER_TEXT.map(lambda text: "Bearer " + text)),
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["name", "scopes", "expiresInSeconds", "x"]), inner, max_size=4
            )
        ),
        max_leaves=8,
    ),
)
async def test_no_token_input_produces_a_500(
    api: Client, person: dict[str, str], authorization: str, body: Any
) -> None:
    guarded = await api.get("/api/counters/k", headers={"Authorization": authorization})
    assert guarded.status in (400, 401, 404), await guarded.text()
    if guarded.status == 401:
        assert guarded.headers["WWW-Authenticate"].startswith(CHALLENGE)
    data = json.dumps(body).encode()
    headers = {**person, "Content-Type": "application/json"}
    made_ = await api.post("/api/tokens", data=data, headers=headers)
    # 409: the examples' valid bodies could reach the cap.
    assert made_.status in (201, 400, 409, 422), await made_.text()


async def test_every_read_takes_a_read_token_and_refuses_an_increment_one(
    api: Client, pg: asyncpg.Connection
) -> None:
    """The lookup and the listing, like the one-counter read: a `read` token reads (counters
    are global: any user's token reads every counter), an `increment` token is 403."""
    await pg.execute(
        "INSERT INTO counters VALUES ('fruit:apple', 3, now()), ('fruit:pear', 4, now())"
    )
    _, cookie = await signed_up(api)
    reader = (await made(api, cookie, ["read"]))["token"]
    writer = (await made(api, cookie, ["increment"]))["token"]
    lookup = {"keys": ["fruit:apple", "nothing"]}
    found = await api.post("/api/counters/lookup", json=lookup, headers=bearer(reader))
    assert found.status == 200
    body = await found.json()
    assert [(c["key"], c["value"]) for c in body["counters"]] == [("fruit:apple", 3)]
    assert body["missing"] == ["nothing"]
    page = await api.get("/api/counters?prefix=fruit:", headers=bearer(reader))
    assert page.status == 200
    assert [c["key"] for c in (await page.json())["counters"]] == ["fruit:apple", "fruit:pear"]
    for refused in (
        await api.post("/api/counters/lookup", json=lookup, headers=bearer(writer)),
        await api.get("/api/counters?prefix=fruit:", headers=bearer(writer)),
    ):
        await assert_problem(refused, 403)
        assert error_of(refused) == "insufficient_scope"
    for nothing in (
        await api.post("/api/counters/lookup", json=lookup),
        await api.get("/api/counters?prefix=fruit:"),
    ):
        await assert_problem(nothing, 401)
        assert nothing.headers["WWW-Authenticate"] == CHALLENGE


async def test_a_token_reads_its_own_writes(api: Client) -> None:
    _, cookie = await signed_up(api)
    writer = (await made(api, cookie, ["increment"]))["token"]
    headers = {**bearer(writer), "Prefer": "durable, return=representation"}
    answer = await api.post("/api/increment", json={"key": "mine", "value": 2}, headers=headers)
    assert answer.status == 200
    assert [(c["key"], c["value"]) for c in (await answer.json())["counters"]] == [("mine", 2)]
