"""The resources of an app, in one place and in start-up order.

Each function below is one of aiohttp's cleanup contexts: at start-up each runs to its
``yield`` in the order ``register`` gives, and after the requests have drained they finish in
the reverse order. So the order is the design:

1. ``tracing`` (only with OTEL_EXPORTER_OTLP_ENDPOINT): first in, last out, so that the spans
   of the final flush are exported too.
2. ``postgres``: the pool, ``min_size=0``: a replica starts (and buffers increments) while
   Postgres is down.
3. ``redis``: the client (sessions, their revocation, the throttles).
4. ``sessions``: the session store and its revocation listener; it needs the Redis client, and
   stops before it closes.
5. ``passwords``: the thread pool bcrypt runs on, off the event loop.
6. ``tokens``: the token check, its revocation listener (a Postgres connection of its own)
   and the writer of ``lastUsedAt``; after Postgres, and it closes before the pool does (its
   last usage write needs it).
7. ``write_behind``: after Postgres and Redis, so that its final flush runs while both are
   open; requests have drained when it closes, so nothing is added behind the final flush. It
   gets what is left of the shutdown budget, less what the closes after it keep.
8. ``sampler``: last in, first out: once requests have drained, it publishes the final numbers
   and the last access log lines.

Shutdown has one budget: ``app[SHUTDOWN]``, a deadline fixed at SIGTERM (by the command; by
``draining``, the first shutdown hook, otherwise). ``draining`` runs as the requests' drain
begins and answers the durable requests whose group was never sent; every cleanup context
below takes what is left of the budget, less what the steps after it keep (settings.py says
how much: ``shutdown_close_seconds``, ``shutdown_exit_seconds``).

Resource modules know nothing of the app: they make and close their resource; only this module
(and the views, which read them) use the typed keys of appkeys.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from . import db, metrics, redis_client
from .appkeys import (
    ACCESS_LOG,
    FLUSH_OFFSET,
    METRICS,
    PASSWORDS,
    PG_POOL,
    REDIS,
    SESSIONS,
    SETTINGS,
    SHUTDOWN,
    TOKENS,
    TRACER_PROVIDER,
    WRITE_BEHIND,
)
from .sessions import SessionStore
from .shutdown import Deadline
from .tokens import Tokens
from .tracing import TRACER_NAME
from .users import Passwords
from .writebehind import WriteBehind

log = logging.getLogger("increment_service")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

#: A durable request whose group is out gets its answer this long before the drain ends, so
#: that it is written before aiohttp cancels the requests still running.
ANSWER_BEFORE_DRAIN_ENDS_SECONDS = 0.2


def register(app: web.Application) -> None:
    """Add the app's cleanup contexts, in start-up order (see above), and the hook that
    begins the shutdown."""
    app[SHUTDOWN] = Deadline(app[SETTINGS].shutdown_timeout_seconds)  # the command's replaces it
    if TRACER_PROVIDER in app:
        app.cleanup_ctx.append(tracing)
    app.cleanup_ctx.extend([postgres, redis, sessions, passwords, tokens, write_behind, sampler])
    app.on_shutdown.append(draining)


def _after_write_behind(app: web.Application) -> float:
    """What the steps after the write-behind's close keep of the budget."""
    settings = app[SETTINGS]
    return settings.shutdown_close_seconds + settings.shutdown_exit_seconds


async def draining(app: web.Application) -> None:
    """The first shutdown hook, as the requests' drain begins (the listening socket is
    closed): the deadline is fixed if no signal did, and durable requests waiting for a group
    never sent are answered ``503 not-committed`` at once."""
    deadline = app[SHUTDOWN]
    deadline.start()
    drain = app[SETTINGS].drain_seconds(deadline.seconds)
    until_drained = deadline.left(keep=deadline.seconds - drain)
    if WRITE_BEHIND in app:
        app[WRITE_BEHIND].shut(
            answer_within=max(0.0, until_drained - ANSWER_BEFORE_DRAIN_ENDS_SECONDS)
        )


async def tracing(app: web.Application) -> AsyncIterator[None]:
    yield
    # Exports what is left: blocking, so in a thread of its own, waited for within the budget
    # (a daemon thread: an export still hanging then does not hold the exit).
    exporting = threading.Thread(
        target=app[TRACER_PROVIDER].shutdown, name="span export", daemon=True
    )
    exporting.start()
    within = app[SHUTDOWN].left(keep=app[SETTINGS].shutdown_exit_seconds)
    await asyncio.to_thread(exporting.join, within)
    if exporting.is_alive():
        log.warning(
            "the last spans were not exported within the shutdown budget",
            extra={"event": "shutdown-tracing"},
        )


async def postgres(app: web.Application) -> AsyncIterator[None]:
    database_url = app[SETTINGS].database_url
    assert database_url is not None  # create_app refuses settings without one
    pool = await db.create_pool(database_url)
    app[PG_POOL] = pool
    yield
    await db.close_pool(pool, within=app[SHUTDOWN].left(keep=app[SETTINGS].shutdown_exit_seconds))


async def redis(app: web.Application) -> AsyncIterator[None]:
    redis_url = app[SETTINGS].redis_url
    assert redis_url is not None  # create_app refuses settings without one
    client = redis_client.create_client(redis_url)
    app[REDIS] = client
    yield
    await client.aclose()


async def sessions(app: web.Application) -> AsyncIterator[None]:
    store = SessionStore(app[REDIS], app[SETTINGS], app[METRICS])
    app[SESSIONS] = store
    store.start()
    yield
    await store.close()


async def passwords(app: web.Application) -> AsyncIterator[None]:
    hasher = Passwords(workers=os.cpu_count() or 2)
    app[PASSWORDS] = hasher
    yield
    hasher.close()


async def tokens(app: web.Application) -> AsyncIterator[None]:
    database_url = app[SETTINGS].database_url
    assert database_url is not None  # create_app refuses settings without one
    service = Tokens(app[PG_POOL], database_url, app[METRICS])
    app[TOKENS] = service
    service.start()
    yield
    await service.close(within=app[SETTINGS].shutdown_close_seconds / 2)


async def write_behind(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    provider = app.get(TRACER_PROVIDER)
    service = WriteBehind(
        app[PG_POOL],
        app[METRICS],
        replica_id=settings.replica_id,
        flush_interval=settings.flush_interval_seconds,
        max_pending_keys=settings.max_pending_keys,
        idempotency_ttl=settings.idempotency_ttl_seconds,
        durable_timeout=settings.durable_timeout_seconds,
        tracer=provider.get_tracer(TRACER_NAME) if provider is not None else None,
    )
    app[WRITE_BEHIND] = service
    service.start(offset=app.get(FLUSH_OFFSET, 0.0))
    yield
    await service.close(within=app[SHUTDOWN].left(keep=_after_write_behind(app)))


async def sampler(app: web.Application) -> AsyncIterator[None]:
    numbers, access_log = app[METRICS], app.get(ACCESS_LOG)
    task = asyncio.create_task(metrics.sample(numbers, access_log), name="sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    metrics.publish_final(numbers, access_log)
