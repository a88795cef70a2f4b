"""The listing by prefix under write load: pages of 100 (``GET /api/counters``) over a million
counters at 200 pages/s while 5,000 increments/s flow into the same counters, for 60 s. The
target: the pages' p99 under 10 ms.

    python -m bench.reads [--counters 1000000] [--duration 60] [--page-rate 200]
                          [--increment-rate 5000] [--workers 2] [--quick]

Steps, all on 127.0.0.1: a database of its own (``bench_reads``; ICU ``en-US`` as its default
collation where the server has ICU, so the byte-order index is the only one that can serve a
page, as on a production database that is not "C"), migrated to just before 0007; the counters
loaded with one ``INSERT ... SELECT generate_series`` (keys ``bench:0000000`` ...); migration
0007 timed as it builds the index over them; the plan of a page printed (EXPLAIN ANALYZE, and
the generic plan a prepared statement settles on); the service started (``WORKERS``); a user
logged in; then two open-loop generators (bench/openloop.py) side by side: page reads, each a
random 4-digit prefix (10,000 keys) from a random key inside it (``after``), 100 a page; and
single increments (``POST /increment``) of random keys among the million. Every figure of the
run goes to ``--out`` (default bench/results/reads.json) and a summary to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from tests.support.postgres import with_database

from bench import openloop
from bench.config import BENCH_DIR, log
from bench.driving import client_session, scrape, session_cookie
from bench.servers import Server, start_server, wait_ready
from increment_service.db import MIGRATION_LOCK_KEY, migrate, schema_dir, sqlalchemy_url

KEY_DIGITS = 7  # bench:0000000 ... bench:0999999 for a million


def page_target(n: int, counters: int = 1_000_000, limit: int = 100) -> str:
    """A page of request n: a random 4-digit prefix (10,000 keys of a million), from a random
    key inside it."""
    key = random.randrange(counters)
    name = f"bench:{key:0{KEY_DIGITS}d}"
    prefix = name[: len("bench:") + 4]
    return f"/api/counters?prefix={quote(prefix)}&after={quote(name)}&limit={limit}"


def no_body(n: int) -> bytes:
    return b""


def increment_of_a_stored_key(n: int, counters: int = 1_000_000) -> bytes:
    return b'{"key":"bench:%0*d","value":1}' % (KEY_DIGITS, random.randrange(counters))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _collation(admin_url: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        icu = await conn.fetchval("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")
    finally:
        await conn.close()
    return (
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'" if icu else ""
    )


def _upgrade_to(url: str, revision: str) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(schema_dir()))
    config.attributes["database_url"] = sqlalchemy_url(url)
    config.attributes["lock_key"] = MIGRATION_LOCK_KEY
    command.upgrade(config, revision)


def _before_0007() -> str:
    config = AlembicConfig()
    config.set_main_option("script_location", str(schema_dir()))
    before = ScriptDirectory.from_config(config).get_revision("0007").down_revision
    assert isinstance(before, str)
    return before


async def prepare(admin_url: str, database: str, counters: int) -> dict[str, Any]:
    """The database, loaded, and what building the index over it took."""
    clause = await _collation(admin_url)
    await _admin(
        admin_url,
        f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)',
        f'CREATE DATABASE "{database}" {clause}',
    )
    url = with_database(admin_url, database)
    await asyncio.to_thread(_upgrade_to, url, _before_0007())
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        await conn.execute(
            "INSERT INTO counters (key, value, updated_at)"
            " SELECT 'bench:' || lpad(n::text, $2, '0'), n, now()"
            " FROM generate_series(0, $1 - 1) AS n",
            counters,
            KEY_DIGITS,
        )
        await conn.execute("VACUUM ANALYZE counters")
        loaded = time.monotonic() - started
        collation = await conn.fetchval(
            "SELECT datlocprovider::text || ' ' || datcollate FROM pg_database"
            " WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    started = time.monotonic()
    await asyncio.to_thread(migrate, url)  # 0007: CREATE INDEX CONCURRENTLY over them
    built = time.monotonic() - started
    return {
        "database": database,
        "collation": collation,
        "counters": counters,
        "load_s": round(loaded, 2),
        "migration_0007_s": round(built, 2),
    }


class _Explaining:
    """A connection that runs EXPLAIN (ANALYZE, BUFFERS) of each statement it fetches first."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, sql: str, *args: Any, **options: Any) -> list[Any]:
        rows = await self.conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        self.plans.append("\n".join(row[0] for row in rows))
        result: list[Any] = await self.conn.fetch(sql, *args, **options)
        return result


async def plans(url: str) -> dict[str, str]:
    """EXPLAIN ANALYZE of one page as the service asks it, custom and generic plans."""
    from increment_service import counters as storage

    found: dict[str, str] = {}
    conn = await asyncpg.connect(url)
    try:
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            explaining: Any = _Explaining(conn)  # fetch is all page() uses
            await storage.page(explaining, "bench:0123", "bench:0123456", 100)
            found[mode] = explaining.plans[0]
    finally:
        await conn.close()
    return found


def buckets(exposition: str, name: str, label: str) -> dict[str, float]:
    """The cumulative buckets (le -> count, summed over series) of histogram ``name`` whose
    labels hold ``label``."""
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(name + "_bucket{") and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            found[le] = found.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


async def server_view(session: Any, url: str) -> dict[str, Any]:
    """What the service itself measured: its handler time of the page route (from the
    middleware: no queueing before it), and its flushes."""
    text = await scrape(session, url) or ""
    return {
        "page_handler_buckets": buckets(
            text, "http_request_duration_seconds", 'route="/api/counters"'
        ),
        "flush_duration_buckets": buckets(text, "increment_flush_duration_seconds", ""),
    }


async def drive(args: argparse.Namespace, server: Server, cookie: str) -> dict[str, Any]:
    reads = openloop.Plan(
        server.url,
        "/api/counters?prefix=&after=&limit=100",
        args.page_rate,
        args.duration,
        body=no_body,
        headers={"Cookie": cookie},
        method="GET",
        connections=16,
        warmup=args.warmup,
        target=functools.partial(page_target, counters=args.counters),
    )
    increments = openloop.Plan(
        server.url,
        "/increment",
        args.increment_rate,
        args.duration,
        body=functools.partial(
            increment_of_a_stored_key, counters=args.increment_keys or args.counters
        ),
        connections=64,
        processes=args.increment_processes,
        warmup=args.warmup,
    )
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    page_result, increment_result = await asyncio.gather(
        openloop.run(reads), openloop.run(increments)
    )
    cores = (server.cpu_seconds() - cpu_before) / (time.monotonic() - started)
    return {
        "pages": page_result.as_dict(),
        "increments": increment_result.as_dict(),
        "server_cpu_cores": round(cores, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    admin_url = args.postgres
    log(f"loading {args.counters:,} counters into {args.database}")
    prepared = await prepare(admin_url, args.database, args.counters)
    log(f"loaded in {prepared['load_s']} s; migration 0007 took {prepared['migration_0007_s']} s")
    url = with_database(admin_url, args.database)
    explained = await plans(url)
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(args.redis)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    out_dir = args.out.parent
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    config: Any = argparse.Namespace(  # what start_server reads of a bench Config
        logs=out_dir / "logs",
        database_url=url,
        redis=args.redis,
        service_pythonpath=None,
    )
    server = start_server(config, "service", args.workers)
    try:
        async with client_session() as session:
            await wait_ready(server, session)
            cookie, note = await session_cookie(session, server.url, "bench:check")
            if cookie is None:
                raise SystemExit(note)
            async with session.get(
                server.url + page_target(0, args.counters), headers={"Cookie": cookie}
            ) as response:
                assert response.status == 200, await response.text()
        log(
            f"driving {args.page_rate:g} pages/s and {args.increment_rate:g} increments/s"
            f" for {args.duration:g} s ({args.workers} workers)"
        )
        driven = await drive(args, server, cookie)
        async with client_session() as session:
            driven["server"] = await server_view(session, server.url)
    finally:
        server.stop()
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "counters": args.counters,
            "page_rate": args.page_rate,
            "increment_rate": args.increment_rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "increment_keys": args.increment_keys or args.counters,
        },
        "prepared": prepared,
        "plans": explained,
        **driven,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--database", default="bench_reads")
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument("--counters", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--page-rate", type=float, default=200)
    parser.add_argument("--increment-rate", type=float, default=5000)
    parser.add_argument("--increment-processes", type=int, default=1)
    parser.add_argument(
        "--increment-keys",
        type=int,
        default=0,
        help="increment only the first N counters (0: all of them), so a flush rewrites fewer rows",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "reads.json")
    parser.add_argument("--quick", action="store_true", help="15 s, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 15.0, 3.0
    results = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    pages, increments = results["pages"], results["increments"]
    print(
        json.dumps(
            {
                "prepared": results["prepared"],
                "pages": {k: pages[k] for k in ("achieved_rate", "statuses", "lost", "latency")},
                "increments": {
                    k: increments[k] for k in ("achieved_rate", "statuses", "lost", "latency")
                },
                "server_cpu_cores": results["server_cpu_cores"],
            },
            indent=2,
        )
    )
    print(results["plans"]["force_generic_plan"])
    p99 = pages["latency"]["p99_ms"]
    print(f"page p99: {p99} ms (target: under 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
