"""Checks of the load balancer's two nginx configurations (deploy/nginx: compose's nginx.conf
and the native topology's native.conf.template), with no Docker engine and no network.

- PyPI ``crossplane`` (NGINX's parser for Python) parses both, to compare their shape.
- Debian ``nginx``: ``nginx -t`` on both configurations, and a live round-robin check of the
  native one against three stand-in replicas (skipped when nginx is not installed).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import crossplane  # type: ignore[import-untyped]  # PyPI crossplane (the test extra); no stubs
import pytest

from increment_service.validation.bodies import MAX_BODY_BYTES
from increment_service.validation.increments import MAX_BATCH_BODY_BYTES
from increment_service.validation.reads import MAX_LOOKUP_BODY_BYTES
from tests.support.net import free_port, serving
from tests.support.nginx import NGINX_COMPOSE, NginxProcess, nginx_binary, render_native_nginx

# (name, arguments, children or None for a simple directive)
_Directive = tuple[str, tuple[str, ...], Any]


def _nginx_parse(path: Path) -> list[_Directive]:
    """The directives of an nginx configuration file, parsed by crossplane (NGINX's parser
    for Python). Quotes are taken off arguments, as nginx does."""
    parsed = crossplane.parse(str(path), single=True, comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    [config] = parsed["config"]

    def directives(block: list[dict[str, Any]]) -> list[_Directive]:
        return [
            (d["directive"], tuple(d["args"]), directives(d["block"]) if "block" in d else None)
            for d in block
        ]

    return directives(config["parsed"])


# Directives allowed to differ between the two topologies.
_NGINX_TOPOLOGY_SPECIFIC = {
    "worker_processes",
    "worker_connections",
    "pid",
    "error_log",
    "access_log",
    "resolver",
    "resolver_timeout",
    "listen",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
    "client_body_buffer_size",
    "proxy_max_temp_file_size",
}


def _nginx_shape(directives: list[_Directive], context: tuple[str, ...] = ()) -> set[Any]:
    shape: set[Any] = set()
    for name, args, children in directives:
        if name in _NGINX_TOPOLOGY_SPECIFIC:
            continue
        if name == "server" and context and context[-1].startswith("upstream"):
            continue  # the upstream's members: compared separately
        if children is None:
            shape.add((context, name, args))
        else:
            shape |= _nginx_shape(children, (*context, " ".join((name, *args))))
    return shape


def _find(directives: list[_Directive], *path: str) -> list[_Directive]:
    """Directives at a path of block names, e.g. ("http", "upstream increment_service")."""
    current = directives
    for step in path:
        current = next(
            children
            for name, args, children in current
            if children is not None and " ".join((name, *args)) == step
        )
    return current


def _native_conf(directory: Path) -> Path:
    """native.conf.template rendered for three replicas, in a file for crossplane to read."""
    path = directory / "native.conf"
    path.write_text(render_native_nginx(directory, 8080, [3401, 3402, 3403]), encoding="utf-8")
    return path


def test_nginx_configs_have_the_same_shape(tmp_path: Path) -> None:
    compose_conf = _nginx_parse(NGINX_COMPOSE)
    native_conf = _nginx_parse(_native_conf(tmp_path))
    compose_shape, native_shape = _nginx_shape(compose_conf), _nginx_shape(native_conf)
    assert compose_shape == native_shape, {
        "only in nginx.conf": sorted(map(str, compose_shape - native_shape)),
        "only in native.conf.template": sorted(map(str, native_shape - compose_shape)),
    }


def test_nginx_upstreams_balance_with_keepalive_and_request_ids(tmp_path: Path) -> None:
    compose_conf = _nginx_parse(NGINX_COMPOSE)
    native_conf = _nginx_parse(_native_conf(tmp_path))

    compose_http = _find(compose_conf, "http")
    resolver = next(args for name, args, _ in compose_http if name == "resolver")
    assert resolver[0] == "127.0.0.11", "resolve `app` through Docker's embedded DNS"

    compose_servers = [
        args
        for name, args, _ in _find(compose_conf, "http", "upstream increment_service")
        if name == "server"
    ]
    assert len(compose_servers) == 1
    assert compose_servers[0][0] == "app:3333"
    assert "resolve" in compose_servers[0], "re-resolve so every replica gets traffic"
    native_servers = [
        args
        for name, args, _ in _find(native_conf, "http", "upstream increment_service")
        if name == "server"
    ]
    assert [args[0] for args in native_servers] == [
        "127.0.0.1:3401",
        "127.0.0.1:3402",
        "127.0.0.1:3403",
    ]
    compose_parameters = [a for a in compose_servers[0][1:] if a != "resolve"]
    assert all(list(args[1:]) == compose_parameters for args in native_servers)

    upstream = {
        name: args for name, args, _ in _find(compose_conf, "http", "upstream increment_service")
    }
    assert "keepalive" in upstream
    assert "zone" in upstream, "`resolve` needs a shared-memory zone"
    location = _find(compose_conf, "http", "server", "location /")
    settings = {(name, args[0]): args[1:] for name, args, _ in location if args}
    assert settings[("proxy_http_version", "1.1")] == ()
    assert settings[("proxy_set_header", "Connection")] == ("",)
    assert settings[("proxy_set_header", "X-Request-ID")] == ("$req_id",)
    assert settings[("proxy_pass", "http://increment_service")] == ()


def _nginx() -> str:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    return nginx


def _nginx_test(nginx: str, prefix: Path, conf: Path, *extra: str) -> None:
    result = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_nginx_accepts_native_config(tmp_path: Path) -> None:
    nginx = _nginx()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_native_nginx(tmp_path, 18080, [13401, 13402, 13403]), encoding="utf-8")
    _nginx_test(nginx, tmp_path, conf)


def test_nginx_accepts_compose_config_outside_docker(tmp_path: Path) -> None:
    """The compose config, with its Docker-only parts swapped for local ones.

    `app` does not resolve here and `server ... resolve` needs nginx >= 1.27.3 (Debian
    has older): the upstream member becomes 127.0.0.1 and loses `resolve`. Everything
    else is checked as written.
    """
    nginx = _nginx()
    text = NGINX_COMPOSE.read_text(encoding="utf-8")
    text, count = re.subn(
        r"^(\s*)server app:3333 resolve", r"\1server 127.0.0.1:13401", text, flags=re.MULTILINE
    )
    assert count == 1
    text = text.replace("/dev/stdout", str(tmp_path / "access.log"))
    text = text.replace("/dev/stderr", str(tmp_path / "error.log"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    _nginx_test(nginx, tmp_path, conf, "-g", f"pid {tmp_path / 'nginx.pid'};")


class _ReplicaHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp does
    #: What the stand-in replicas saw, in order (the test clears it).
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        address = self.server.server_address
        assert isinstance(address, tuple)
        self.seen.append(
            {
                "replica": address[1],
                "connection": self.client_address,
                "headers": dict(self.headers.items()),
            }
        )
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _running_nginx(prefix: Path, upstream_ports: list[int]) -> Iterator[int]:
    with NginxProcess(prefix, upstream_ports, binary=_nginx()) as nginx:
        yield nginx.port


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_native_nginx_spreads_requests_over_three_replicas(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(serving(_ReplicaHandler)) for _ in range(3)]
        seen = _ReplicaHandler.seen
        seen.clear()
        ports = [replica.server_address[1] for replica in replicas]
        listen = stack.enter_context(_running_nginx(tmp_path, ports))

        for number in range(30):
            status, _, _ = _get(listen, f"/api/health?n={number}")
            assert status == 200

        counts = {port: sum(1 for s in seen if s["replica"] == port) for port in ports}
        assert all(count >= 5 for count in counts.values()), counts
        # Upstream keep-alive: nginx reuses its connections to the replicas.
        assert len({s["connection"] for s in seen}) < len(seen)

        seen.clear()
        _get(listen, "/api/health", {"X-Request-ID": "req-from-client-1"})
        _get(listen, "/api/health")
        passed, generated = (s["headers"] for s in seen)
        assert passed["X-Request-ID"] == "req-from-client-1"
        assert re.fullmatch(r"[0-9a-f]{32}", generated["X-Request-ID"])
        assert passed["X-Forwarded-For"] == "127.0.0.1"
        assert passed["X-Forwarded-Proto"] == "http"
        assert passed["Host"] == f"127.0.0.1:{listen}"
        assert "Connection" not in passed, "keep-alive needs Connection cleared"


def test_native_nginx_answers_problem_json_when_no_replica_is_up(tmp_path: Path) -> None:
    with _running_nginx(tmp_path, [free_port()]) as listen:
        status, headers, body = _get(listen, "/increment", {"X-Request-ID": "req-502"})
    assert status == 502
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Request-ID"] == "req-502"
    problem = json.loads(body)
    assert problem["status"] == 502
    assert {"type", "title", "detail"} <= set(problem)


#: Each route's body limit, as the service has it (validation/): nginx's must be the same.
BODY_LIMITS = [
    ("/increment", MAX_BODY_BYTES),
    ("/api/increment", MAX_BODY_BYTES),
    ("/api/users", MAX_BODY_BYTES),
    ("/increments", MAX_BATCH_BODY_BYTES),
    ("/api/increments", MAX_BATCH_BODY_BYTES),
    ("/api/counters/lookup", MAX_LOOKUP_BODY_BYTES),
]


@pytest.mark.parametrize(("path", "limit"), BODY_LIMITS)
def test_native_nginx_refuses_bodies_over_what_the_route_takes(
    tmp_path: Path, path: str, limit: int
) -> None:
    with _running_nginx(tmp_path, [free_port()]) as listen:
        connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        try:
            connection.putrequest("POST", path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(limit + 1))
            connection.endheaders()
            response = connection.getresponse()
            status, content_type, body = (
                response.status,
                response.headers["Content-Type"],
                response.read(),
            )
        finally:
            connection.close()
    assert status == 413
    assert content_type == "application/problem+json"
    assert json.loads(body)["status"] == 413


@pytest.mark.parametrize(("path", "limit"), BODY_LIMITS)
def test_native_nginx_passes_a_body_at_the_route_limit(
    tmp_path: Path, path: str, limit: int
) -> None:
    # No replica is up: a body nginx passes on gets its 502, one it refuses a 413.
    with _running_nginx(tmp_path, [free_port()]) as listen:
        connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        try:
            connection.request(
                "POST", path, body=b" " * limit, headers={"Content-Type": "application/json"}
            )
            status = connection.getresponse().status
        finally:
            connection.close()
    assert status == 502
