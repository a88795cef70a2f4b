"""What the reference servers (ceiling.py, naive.py) share: the edge of POST /increment and a
multi-process runner.

The validation is the service's contract (SPEC.md, "Increment body") written out plainly, with
no dependency on the service's code, so the ceiling stays a fixed reference while the service
changes: Content-Type application/json, a body of at most 4 KiB, strict UTF-8 JSON without
NaN/Infinity or duplicate member names, an object with exactly ``key`` (1 to 256 characters, no
control characters or lone surrogates) and ``value`` (an int, not a bool, within +-(2^53-1)).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

MAX_BODY_BYTES = 4096
MAX_KEY_CHARS = 256
MAX_SAFE_INTEGER = 2**53 - 1
_FORBIDDEN_IN_KEY = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MEMBERS = frozenset(("key", "value"))


class _Rejected(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Rejected(400)
    return obj


def _no_constants(name: str) -> Any:
    raise _Rejected(400)


async def read_increment(request: web.Request) -> tuple[str, int]:
    """The (key, value) of a valid body; raises an HTTP error with the service's status codes."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType()
    body = await request.read()  # client_max_size bounds it (413)
    try:
        data = json.loads(
            body.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constants
        )
    except _Rejected:
        raise web.HTTPBadRequest() from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise web.HTTPBadRequest() from None
    if type(data) is not dict or data.keys() != _MEMBERS:
        raise web.HTTPUnprocessableEntity()
    key, value = data["key"], data["value"]
    if (
        type(key) is not str
        or not 1 <= len(key) <= MAX_KEY_CHARS
        or _FORBIDDEN_IN_KEY.search(key)
        or type(value) is not int
        or not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
    ):
        raise web.HTTPUnprocessableEntity()
    return key, value


def parse_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    return parser


def serve(app_factory: Callable[[], web.Application], host: str, port: int, reuse: bool) -> None:
    """One worker: uvloop, no access log, like the service's worker."""
    import uvloop

    web.run_app(
        app_factory(),
        host=host,
        port=port,
        reuse_port=reuse,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


def main_for(app_factory: Callable[[], web.Application], description: str) -> int:
    """The command of a reference server without options of its own (ceiling.py, bare.py)."""
    args = parse_args(description).parse_args()
    if args.workers > 1 and not args.worker_process:
        return run_workers(sys.argv, args.workers)
    serve(app_factory, args.host, args.port, reuse=args.workers > 1)
    return 0


def run_workers(argv: list[str], workers: int) -> int:
    """Start ``workers`` copies of this script (``--worker-process``) sharing the port with
    reuse_port, forward SIGTERM/SIGINT to them, and wait. Any worker exiting stops the rest."""
    children = [
        subprocess.Popen([sys.executable, *argv, "--worker-process"]) for _ in range(workers)
    ]

    def stop(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        pid, code = os.wait()
        for child in list(children):
            if child.pid == pid:
                children.remove(child)
                status = status or abs(os.waitstatus_to_exitcode(code))
                stop(signal.SIGTERM, None)
    return status
