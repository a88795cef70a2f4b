"""The one middleware every request goes through.

It refuses compressed bodies, turns domain errors into problem+json answers, times the
request, counts it in flight, tags it with a request id and logs it. One middleware rather
than two: aiohttp wraps each middleware in a call of its own, and on the hot path that wrapper
cost about as much as the work of the second middleware (bench/README.md).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .errors import ProblemError, problem_response
from .localmetrics import HistogramChild
from .logs import AccessLog
from .metrics import Metrics
from .validation.bodies import refuse_content_coding

log = logging.getLogger(__name__)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNMATCHED = "unmatched"
# aiohttp's own exceptions carry headers a client needs (Allow on 405); keep those, and drop
# the ones describing aiohttp's text body.
_DROPPED_HEADERS = frozenset({"Content-Type", "Content-Length"})


def route_label(request: web.Request) -> str:
    """The route template, never the raw path: label cardinality stays bounded."""
    resource = request.match_info.route.resource
    return _UNMATCHED if resource is None else resource.canonical


class RequestIds:
    """Ids for requests that come without one: unique, not secret. A random prefix per
    process and a counter cost no system call per request, unlike uuid4."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count(1)

    def __call__(self, given: str | None) -> str:
        # Keep a caller's id only if it is short and printable; it ends up in every log line.
        if given and len(given) <= 128 and given.isascii() and given.isprintable():
            return given
        return f"{self._prefix}{next(self._next):08x}"


def as_problem(request: web.Request, exc: Exception) -> web.Response:
    """The problem+json answer for an exception a handler raised (a bug is a 500)."""
    if isinstance(exc, ProblemError):
        return problem_response(
            exc.status, exc.title, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers
        )
    if isinstance(exc, web.HTTPException):
        headers = {k: v for k, v in exc.headers.items() if k not in _DROPPED_HEADERS}
        detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        return problem_response(exc.status, exc.reason, detail, headers=headers)
    # A bug. The client gets a problem, never a stack trace; the log gets the trace.
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"event": "error", "path": request.path[:256]},
    )
    return problem_response(500, "Internal Server Error", "the server failed unexpectedly")


def request_middleware(metrics: Metrics, access_log: AccessLog | None) -> Middleware:
    request_id = RequestIds()
    # (method, route, status) -> its histogram series: the label sets are few.
    series: dict[tuple[str, str, int], HistogramChild] = {}
    requests = metrics.requests

    def observe(method: str, route: str, status: int, seconds: float) -> None:
        child = series.get((method, route, status))
        if child is None:
            child = series[(method, route, status)] = requests.labels(method, route, str(status))
        child.observe(seconds)

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id(request.headers.get("X-Request-ID"))
        metrics.requests_in_flight += 1
        status = 500  # what the client sees if the handler is cancelled mid-way
        try:
            try:
                if hdrs.CONTENT_ENCODING in request.headers:
                    refuse_content_coding(request)  # before any byte of the body is read
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:  # a redirect: aiohttp sends it as it is
                    status = exc.status
                    raise
                response = as_problem(request, exc)
            except Exception as exc:  # noqa: BLE001 -- every error becomes a problem answer
                response = as_problem(request, exc)
            status = response.status
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            metrics.requests_in_flight -= 1
            duration = time.perf_counter() - started
            method = request.method if request.method in _METHODS else "OTHER"
            route = route_label(request)
            observe(method, route, status, duration)
            if access_log is not None and access_log.wants(status):
                access_log.write(
                    {
                        "event": "request",
                        "method": method,
                        "route": route,
                        "path": request.path[:256],
                        "status": status,
                        "duration": round(duration, 6),
                        "request_id": rid,
                    }
                )

    return handle
