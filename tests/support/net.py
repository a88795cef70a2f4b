"""Loopback networking: free ports, plain HTTP GETs, health waits, listening sockets, stand-in
HTTP servers.

Standard library only: the benchmark imports it too (``python -m bench.run``).
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

JSON = {"Content-Type": "application/json"}


async def chunked_increment(pad_kib: int = 8) -> AsyncIterator[bytes]:
    """An increment padded with ``pad_kib`` KiB, as a body to send in chunks: a request with
    no Content-Length, whose size the server learns only as it reads."""
    yield b'{"key": "a", "value": 1, "pad": "'
    for _ in range(pad_kib):
        yield b"x" * 1024
    yield b'"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tcp_listeners(port: int) -> int:
    """How many sockets listen on ``port`` on this machine (Linux: /proc/net/tcp{,6}).

    With ``WORKERS=N`` and ``reuse_port`` every worker has a listening socket of its own."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET, errors included; never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def wait_until_healthy(url: str, timeout: float = 30.0, path: str = "/api/health") -> None:
    """Poll ``url + path`` until it answers 200 (compose's `service_healthy`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, body = http_get(url + path, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as error:
            last = repr(error)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} not healthy within {timeout}s: {last}")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(
    handler: type[http.server.BaseHTTPRequestHandler],
) -> Iterator[http.server.ThreadingHTTPServer]:
    """A stand-in HTTP server with ``handler`` on a free loopback port, in a thread of its own
    (``server.server_address[1]`` is its port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
