"""The middleware every request goes through: domain errors become problem+json answers."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ProblemError, problem_response
from .validation import refuse_content_coding

log = logging.getLogger(__name__)

# aiohttp's own exceptions carry headers a client needs (Allow on 405); keep those, and drop
# the ones describing aiohttp's text body.
_DROPPED_HEADERS = frozenset({"Content-Type", "Content-Length"})


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        refuse_content_coding(request)  # every route, before any byte of the body is read
        return await handler(request)
    except ProblemError as exc:
        return problem_response(
            exc.status, exc.title, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers
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
