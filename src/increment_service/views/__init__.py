"""HTTP handlers, thin: a request read by validation/, storage behind a connection, domain
errors raised for middleware.py to answer.

* ``increments``: the counters (``POST /increment``, ``/api/increment``, ``GET /api/counters``);
* ``accounts``: users and sessions (sign-up, login, who am I, logout);
* ``operations``: health, liveness, the OpenAPI document, ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )
