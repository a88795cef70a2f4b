"""The ceiling: the least a server can do for POST /increment on this machine.

aiohttp + uvloop, the same worker model as the service (N processes sharing the port with
reuse_port), and a handler that only reads the body, parses and validates it like the service
(minimal.read_increment) and adds the value to a dict. No I/O, no metrics, no middleware.

    python bench/ceiling.py --port 8081 --workers 2
"""

from __future__ import annotations

import sys

from aiohttp import web

from minimal import MAX_BODY_BYTES, parse_args, read_increment, run_workers, serve

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


def main() -> int:
    args = parse_args(__doc__ or "").parse_args()
    if args.workers > 1 and not args.worker_process:
        return run_workers(sys.argv, args.workers)
    serve(make_app, args.host, args.port, reuse=args.workers > 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
