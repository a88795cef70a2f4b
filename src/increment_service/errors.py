"""Problem details (RFC 9457): every error the service answers, made in one middleware."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .writebehind import BackpressureError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """A domain error that the middleware turns into a problem+json response."""

    status = 500
    slug = "internal"
    title = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class MalformedJSON(ProblemError):
    status, slug, title = 400, "malformed-json", "Malformed JSON"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Unauthorized"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "Not Found"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "Payload Too Large"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported Media Type"


class ValidationFailed(ProblemError):
    status, slug, title = 422, "validation", "Validation Failed"


class TooManyRequests(ProblemError):
    status, slug, title = 429, "too-many-requests", "Too Many Requests"


class ServiceUnavailable(ProblemError):
    status, slug, title = 503, "unavailable", "Service Unavailable"


def problem_type(slug: str) -> str:
    return f"urn:increment-service:problem:{slug}"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        # about:blank means "the status code says it all" (RFC 9457 section 4.2.1).
        "type": problem_type(slug) if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=PROBLEM_JSON, headers=headers
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own exceptions carry headers a client needs (Allow on 405); keep those, and drop
# the ones describing aiohttp's text body.
_DROPPED_HEADERS = frozenset({"Content-Type", "Content-Length"})


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        return problem_response(
            exc.status, exc.title, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers
        )
    except BackpressureError as exc:
        return problem_response(
            503,
            "Service Unavailable",
            f"{exc}; retry later",
            slug="backpressure",
            headers={"Retry-After": str(exc.retry_after)},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k not in _DROPPED_HEADERS}
        detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        return problem_response(exc.status, exc.reason, detail, headers=headers)
    except Exception:
        # A bug. The client gets a problem, never a stack trace; the log gets the trace.
        log.exception("unhandled error", extra={"event": "error", "path": request.path[:256]})
        return problem_response(500, "Internal Server Error", "the server failed unexpectedly")
