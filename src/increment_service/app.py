"""The application factory: one app per replica process, its resources in cleanup contexts."""

from __future__ import annotations

import logging

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from . import lifecycle, sessions
from .appkeys import ACCESS_LOG, METRICS, SESSIONS, SETTINGS, TRACER_PROVIDER
from .logs import AccessLog, ProtocolErrorLog
from .metrics import Metrics
from .middleware import request_middleware
from .redis_client import unavailable
from .settings import Settings
from .tracing import TRACER_NAME
from .validation.increments import MAX_BATCH_BODY_BYTES
from .validation.reads import MAX_LOOKUP_BODY_BYTES
from .views import accounts, increments, operations, reads, tokens
from .views.guard import guarded


def with_session_middleware(handler: Handler) -> Handler:
    """aiohttp-session's middleware around one handler. Only login creates a session through
    aiohttp-session, so only login pays for its middleware (measured: a middleware on every
    route cost the hot path several per cent)."""

    async def with_session(request: web.Request) -> web.StreamResponse:
        store = request.app[SESSIONS]
        try:
            return await aiohttp_session.session_middleware(store)(request, handler)
        except RedisError as exc:  # the save after a login (handlers map their own errors)
            raise unavailable() from exc

    return with_session


def create_app(settings: Settings) -> web.Application:
    if settings.database_url is None or settings.redis_url is None:
        raise ValueError("create_app needs database_url and redis_url (embedded.py fills them)")
    metrics = Metrics()
    log_requests = settings.access_log and logging.getLevelName(settings.log_level) <= logging.INFO
    access_log = (
        AccessLog(settings.log_format, sample=settings.access_log) if log_requests else None
    )
    app = web.Application(
        # The largest body of any route (a lookup); each route checks its own limit.
        client_max_size=max(MAX_BATCH_BODY_BYTES, MAX_LOOKUP_BODY_BYTES),
        handler_args={
            # Never inflate a request body (see validation/bodies.refuse_content_coding).
            "auto_decompress": False,
            "logger": ProtocolErrorLog(lambda kind: metrics.protocol_errors.labels(kind).inc()),
        },
        middlewares=[request_middleware(metrics, access_log)],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    if access_log is not None:
        app[ACCESS_LOG] = access_log
    if settings.otel_exporter_otlp_endpoint is not None:
        # Only now is OpenTelemetry imported: off, tracing costs nothing.
        from .tracing import make_provider, tracing_middleware

        provider = make_provider(settings.otel_exporter_otlp_endpoint, settings.replica_id)
        app[TRACER_PROVIDER] = provider
        app.middlewares.insert(0, tracing_middleware(provider.get_tracer(TRACER_NAME)))
    lifecycle.register(app)  # every resource, in start-up order

    sessions.silence_session_key_warning()
    open_increment: Handler = increments.increment
    open_batch: Handler = increments.increment_batch
    if settings.increment_auth != "none":
        # session: a session or a token, as /api; token: a token only.
        session = settings.increment_auth == "session"
        open_increment = guarded(open_increment, scope="increment", session=session)
        open_batch = guarded(open_batch, scope="increment", session=session)
    app.router.add_post("/increment", open_increment)
    app.router.add_post("/api/increment", guarded(increments.increment, scope="increment"))
    app.router.add_post("/increments", open_batch)
    app.router.add_post("/api/increments", guarded(increments.increment_batch, scope="increment"))
    app.router.add_get("/api/counters/{key:.+}", guarded(increments.get_counter, scope="read"))
    app.router.add_get("/api/counters", guarded(reads.list_counters, scope="read"))
    app.router.add_post("/api/counters/lookup", guarded(reads.lookup, scope="read"))
    app.router.add_post("/api/tokens", tokens.create_token)
    app.router.add_get("/api/tokens", tokens.list_tokens)
    app.router.add_delete("/api/tokens/{id}", tokens.revoke_token)
    app.router.add_post("/api/users", accounts.create_user)
    app.router.add_post("/api/sessions", with_session_middleware(accounts.login))
    app.router.add_get("/api/sessions", accounts.whoami)
    app.router.add_delete("/api/sessions", accounts.logout)
    app.router.add_get("/api/health", operations.health)
    app.router.add_get("/health", operations.health)
    app.router.add_get("/livez", operations.livez)
    app.router.add_get("/api/openapi.json", operations.openapi_document)
    app.router.add_get("/metrics", operations.metrics)
    return app
