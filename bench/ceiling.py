"""The ceiling: the least a server can do for POST /increment on this machine.

aiohttp + uvloop, the same worker model as the service (N processes sharing the port with
reuse_port), and a handler that only reads the body, parses and validates it like the service
(minimal.read_increment) and adds the value to a dict. No I/O, no metrics, no middleware.

    python bench/ceiling.py --port 8081 --workers 2
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # mypy reads bench/ as the package it is
    from bench.minimal import MAX_BODY_BYTES, main_for, read_increment
else:  # run by path, as a script: its neighbour is a top-level module
    from minimal import MAX_BODY_BYTES, main_for, read_increment

ACCEPTED = 202


def make_app() -> web.Application:
    counts: dict[str, int] = {}

    async def increment(request: web.Request) -> web.Response:
        key, value = await read_increment(request)
        counts[key] = counts.get(key, 0) + value
        return web.Response(status=ACCEPTED)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/increment", increment)
    return app


if __name__ == "__main__":
    sys.exit(main_for(make_app, __doc__ or ""))
