"""Problem details (RFC 9457): the domain errors, each carrying its status, and their body.

The ground floor: this module imports no other module of the package. ``middleware.py`` turns
the errors into responses.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """A domain error that the middleware turns into a problem+json response."""

    status = 500
    slug = "internal"
    title = "Internal Server Error"
    #: The ``Retry-After`` (seconds) every answer of this kind carries unless it is given one:
    #: a 503 and a 409 for a key in use always say when to retry.
    default_retry_after: int | None = None

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
        self.headers = dict(headers or {})
        if self.default_retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.default_retry_after))


class MalformedJSON(ProblemError):
    status, slug, title = 400, "malformed-json", "Malformed JSON"


class InvalidIdempotencyKey(ProblemError):
    status, slug, title = 400, "invalid-idempotency-key", "Invalid Idempotency-Key"


#: The realm of every challenge (RFC 6750 section 3).
REALM = "increment-service"
#: The challenge of a request without credentials: no error code (RFC 6750 section 3.1).
BEARER_CHALLENGE = f'Bearer realm="{REALM}"'


def bearer_challenge(error: str, description: str, scope: str | None = None) -> str:
    """A ``WWW-Authenticate`` challenge with an RFC 6750 error code (no quote or backslash in
    the description: it is ours)."""
    challenge = f'{BEARER_CHALLENGE}, error="{error}", error_description="{description}"'
    return challenge if scope is None else f'{challenge}, scope="{scope}"'


class Unauthorized(ProblemError):
    """Every 401 of the service carries a challenge (RFC 9110 section 15.5.2)."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.headers.setdefault("WWW-Authenticate", BEARER_CHALLENGE)


class InvalidToken(Unauthorized):
    """A bearer token that is malformed, unknown, expired or revoked."""

    slug, title = "invalid-token", "Invalid Token"

    def __init__(self, detail: str) -> None:
        super().__init__(
            detail, headers={"WWW-Authenticate": bearer_challenge("invalid_token", detail)}
        )


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "Forbidden"


class InsufficientScope(Forbidden):
    """A valid token without the scope the route needs."""

    slug, title = "insufficient-scope", "Insufficient Scope"

    def __init__(self, scope: str) -> None:
        detail = f"this route needs a token with the scope {scope}"
        super().__init__(
            detail,
            headers={"WWW-Authenticate": bearer_challenge("insufficient_scope", detail, scope)},
        )


class TokenNotAllowed(Forbidden):
    """Tokens are made, listed and revoked by a person, with a session: never by a token."""

    slug, title = "token-not-allowed", "Token Not Allowed"


class TokenInQuery(ProblemError):
    """A token in the URL ends up in logs and histories: refused, never looked at."""

    status, slug, title = 400, "token-in-query", "Token In Query"

    def __init__(self) -> None:
        detail = "send the token in the Authorization header (Bearer), never in the URL"
        super().__init__(
            detail, headers={"WWW-Authenticate": bearer_challenge("invalid_request", detail)}
        )


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "Not Found"


class Conflict(ProblemError):
    status, slug, title = 409, "conflict", "Conflict"


class TooManyTokens(Conflict):
    """The user holds the most live tokens a user may hold."""

    slug, title = "too-many-tokens", "Too Many Tokens"


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "Payload Too Large"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported Media Type"


class ValidationFailed(ProblemError):
    status, slug, title = 422, "validation", "Validation Failed"


class IdempotencyKeyReused(ProblemError):
    """The key was used for another request (another route kind or other items)."""

    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key Reused"


class KeyInUse(ProblemError):
    """A durable request with this key still waits for its commit on this replica."""

    status, slug, title = 409, "idempotency-key-in-use", "Idempotency-Key In Use"
    default_retry_after = 1


class TooManyRequests(ProblemError):
    status, slug, title = 429, "too-many-requests", "Too Many Requests"


class ServiceUnavailable(ProblemError):
    """A dependency outage or a full replica: every one of them says when to retry."""

    status, slug, title = 503, "unavailable", "Service Unavailable"
    default_retry_after = 1


class BackpressureError(ServiceUnavailable):
    """The replica holds ``MAX_PENDING_KEYS`` keys and items and cannot take more."""

    slug = "backpressure"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "too many keys are waiting to be persisted; retry later",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


class NotCommitted(ServiceUnavailable):
    """A durable request whose group was never sent to Postgres: nothing was applied."""

    slug = "not-committed"


class OutcomeUnknown(ServiceUnavailable):
    """A durable request whose group was sent, without an answer in time: it may have been
    applied, or may be later (the group is retried under the same id)."""

    slug, title = "outcome-unknown", "Outcome Unknown"


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
