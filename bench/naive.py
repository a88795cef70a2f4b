"""The naive design: one additive UPSERT per request, through an asyncpg pool.

Same edge as the ceiling (minimal.read_increment), then
``INSERT ... ON CONFLICT (key) DO UPDATE SET value = naive_counters.value + excluded.value``
on a table of its own, awaited before answering 202 (so every acknowledged increment is
durable, and every request costs a Postgres round trip and a commit).

    python bench/naive.py --port 8082 --workers 2 --database-url postgresql://...
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

if TYPE_CHECKING:  # mypy reads bench/ as the package it is
    from bench.minimal import MAX_BODY_BYTES, parse_args, read_increment, run_workers, serve
else:  # run by path, as a script: its neighbour is a top-level module
    from minimal import MAX_BODY_BYTES, parse_args, read_increment, run_workers, serve

ACCEPTED = 202
TABLE_SQL = """
CREATE TABLE IF NOT EXISTS naive_counters (
    key text PRIMARY KEY,
    value bigint NOT NULL,
    updated_at timestamptz NOT NULL
)
"""
UPSERT_SQL = """
INSERT INTO naive_counters AS naive_counters (key, value, updated_at)
VALUES ($1, $2, now())
ON CONFLICT (key) DO UPDATE
    SET value = naive_counters.value + excluded.value, updated_at = excluded.updated_at
"""
POOL = web.AppKey("pool", asyncpg.Pool)


def make_app(database_url: str, pool_size: int) -> web.Application:
    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size)
        yield
        await app[POOL].close()

    async def increment(request: web.Request) -> web.Response:
        key, value = await read_increment(request)
        async with request.app[POOL].acquire() as conn:
            await conn.execute(UPSERT_SQL, key, value)
        return web.Response(status=ACCEPTED)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/increment", increment)
    return app


async def create_table(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(TABLE_SQL)
    finally:
        await conn.close()


def main() -> int:
    parser = parse_args(__doc__ or "")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pool-size", type=int, default=8, help="connections per worker")
    args = parser.parse_args()
    if not args.worker_process:
        asyncio.run(create_table(args.database_url))
        if args.workers > 1:
            return run_workers(sys.argv, args.workers)
    serve(
        lambda: make_app(args.database_url, args.pool_size),
        args.host,
        args.port,
        reuse=args.workers > 1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
