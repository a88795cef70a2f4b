"""The bare ceiling: the least an aiohttp server can do for POST /increment on this machine.

aiohttp + uvloop, the same worker model as the service (N processes sharing the port with
reuse_port), and a handler that reads the body, parses it with ``orjson.loads``, checks that
``key`` is a str and ``value`` an int, adds the value to a dict and answers 202. No content
type check, no strict JSON rules (duplicate members, key length and characters, value range),
no middleware, no metrics, no I/O: issue 12's reference. ceiling.py is the strict one, which
parses as SPEC.md says; the gap between the two is what the contract's parsing costs.

    python bench/bare.py --port 8081 --workers 2
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:  # mypy reads bench/ as the package it is
    from bench.minimal import MAX_BODY_BYTES, main_for
else:  # run by path, as a script: its neighbour is a top-level module
    from minimal import MAX_BODY_BYTES, main_for

ACCEPTED = 202


def make_app() -> web.Application:
    counts: dict[str, int] = {}

    async def increment(request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
            key, value = data["key"], data["value"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return web.Response(status=400)
        if type(key) is not str or type(value) is not int:
            return web.Response(status=422)
        counts[key] = counts.get(key, 0) + value
        return web.Response(status=ACCEPTED)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/increment", increment)
    return app


if __name__ == "__main__":
    sys.exit(main_for(make_app, __doc__ or ""))
