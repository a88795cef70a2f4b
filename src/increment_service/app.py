"""The application factory: one app per replica process, its resources in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import keys, openapi, sessions, users, views
from .db import pg_ctx
from .logs import AccessLog, ProtocolErrorLog
from .metrics import Metrics, metrics_handler, sampler_ctx
from .middleware import request_middleware
from .redis_client import redis_ctx
from .settings import Settings
from .validation import MAX_BODY_BYTES
from .writebehind import WriteBehind

TRACER_NAME = "increment_service"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def write_behind_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registered after Postgres and Redis, so its final flush runs while both are open."""
    settings = app[keys.SETTINGS]
    provider = app.get(keys.TRACER_PROVIDER)
    write_behind = WriteBehind(
        app[keys.PG_POOL],
        app[keys.METRICS],
        replica_id=settings.replica_id,
        flush_interval=settings.flush_interval_seconds,
        max_pending_keys=settings.max_pending_keys,
        tracer=provider.get_tracer(TRACER_NAME) if provider is not None else None,
    )
    app[keys.WRITE_BEHIND] = write_behind
    write_behind.start()
    yield
    # Requests have drained by now (aiohttp waits for them before cleanup); what is left of
    # the shutdown budget goes to the final flush.
    await write_behind.close(within=final_flush_seconds(settings))


def request_drain_seconds(settings: Settings) -> float:
    return settings.shutdown_timeout_seconds * 0.25


def final_flush_seconds(settings: Settings) -> float:
    return settings.shutdown_timeout_seconds * 0.7


def guarded(handler: Handler) -> Handler:
    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        await sessions.require_session(request)
        return await handler(request)

    return guarded_handler


def create_app(settings: Settings) -> web.Application:
    if settings.database_url is None or settings.redis_url is None:
        raise ValueError("create_app needs database_url and redis_url (embedded.py fills them)")
    metrics = Metrics()
    log_requests = settings.access_log and logging.getLevelName(settings.log_level) <= logging.INFO
    access_log = (
        AccessLog(settings.log_format, sample=settings.access_log) if log_requests else None
    )
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        handler_args={
            # Never inflate a request body (see validation.refuse_content_coding).
            "auto_decompress": False,
            "logger": ProtocolErrorLog(lambda kind: metrics.protocol_errors.labels(kind).inc()),
        },
        middlewares=[request_middleware(metrics, access_log)],
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    if access_log is not None:
        app[keys.ACCESS_LOG] = access_log
    if settings.otel_exporter_otlp_endpoint is not None:
        # Only now is OpenTelemetry imported: off, tracing costs nothing.
        from .tracing import make_provider, tracing_ctx, tracing_middleware

        provider = make_provider(settings.otel_exporter_otlp_endpoint, settings.replica_id)
        app[keys.TRACER_PROVIDER] = provider
        app.middlewares.insert(0, tracing_middleware(provider.get_tracer(TRACER_NAME)))
        app.cleanup_ctx.append(tracing_ctx)  # first in, last out: exports the final flush
    app.cleanup_ctx.extend(
        [
            pg_ctx,
            redis_ctx,
            sessions.sessions_ctx,  # after redis_ctx: it needs the client
            users.passwords_ctx,
            write_behind_ctx,
            sampler_ctx,
        ]
    )

    open_increment = (
        views.increment if settings.increment_auth == "none" else guarded(views.increment)
    )
    app.router.add_post("/increment", open_increment)
    app.router.add_post("/api/increment", guarded(views.increment))
    app.router.add_get("/api/counters/{key:.+}", guarded(views.get_counter))
    app.router.add_post("/api/users", users.create_user)
    app.router.add_post("/api/sessions", sessions.with_session_middleware(sessions.login))
    app.router.add_get("/api/sessions", sessions.read)
    app.router.add_delete("/api/sessions", sessions.logout)
    app.router.add_get("/api/health", views.health)
    app.router.add_get("/health", views.health)
    app.router.add_get("/livez", views.livez)
    app.router.add_get("/api/openapi.json", openapi.handler)
    app.router.add_get("/metrics", metrics_handler)
    return app
