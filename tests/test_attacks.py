"""What an attacker can send costs the service little, and none of it goes unnoticed.

Each test attacks a real service process over real sockets: a gzip bomb, malformed requests
by the hundred, more connections than file descriptors, a path that tries to forge a log line.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.logs import json_log_lines
from tests.support.metrics import scrape_metric
from tests.support.net import http_get
from tests.support.processes import MakeService, ServiceProcess, running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def service(make_service: MakeService) -> Iterator[ServiceProcess]:
    with running(make_service()) as running_service:
        yield running_service


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


def gzip_of_zeros(inflated_mib: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
    mib = bytes(1 << 20)
    return b"".join([compressor.compress(mib) for _ in range(inflated_mib)] + [compressor.flush()])


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` bytes as they are; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_gzip_bomb_is_refused_without_being_inflated(service: ServiceProcess) -> None:
    """About 1 MB of gzip that inflates to 1 GiB, twice. Inflating it costs seconds of CPU
    (3.2 s each, measured here), so the bound below tells "not inflated" from "inflated" by
    a wide margin: it is a resource check, not a timing of the service."""
    assert service.process is not None
    bomb = gzip_of_zeros(1024)
    before = process_cpu_seconds(service.process.pid)
    for _ in range(2):
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        try:
            connection.request(
                "POST",
                "/increment",
                body=bomb,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
            response = connection.getresponse()
            assert response.status == 415
            assert response.headers["Content-Type"] == "application/problem+json"
            response.read()
        finally:
            connection.close()
    assert http_get(service.url + "/livez")[0] == 200
    spent = process_cpu_seconds(service.process.pid) - before
    assert spent < 1.0, f"the service spent {spent:.2f} s of CPU on two refused bodies"


MALFORMED = {
    "request line": b"GET /livez HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "header without colon": b"GET /livez HTTP/1.1\r\nHost: x\r\nnot a header\r\n\r\n",
    "header too large": b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "too many headers": b"GET /livez HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % n for n in range(200))
    + b"\r\n",
    "Content-Length with Transfer-Encoding": (
        b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


def test_malformed_requests_are_a_warning_line_each_and_counted(
    service: ServiceProcess,
) -> None:
    rounds = 20
    for _ in range(rounds):
        for request in MALFORMED.values():
            answer = raw_exchange(service.port, request)
            assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:200]
    assert http_get(service.url + "/livez")[0] == 200
    counted = scrape_metric(service.url, "http_protocol_errors_total")
    assert counted == rounds * len(MALFORMED)
    service.stop()
    log = service.log()
    assert "Traceback" not in log
    refused = [e for e in json_log_lines(log) if e.get("event") == "protocol-error"]
    assert len(refused) == rounds * len(MALFORMED)
    assert {e["level"] for e in refused} == {"warning"}
    assert all(e["remote"] == "127.0.0.1" for e in refused)
    # One line each: nothing else at WARNING or above came with them.
    loud = [e for e in json_log_lines(log) if e["level"] in ("warning", "error", "critical")]
    assert loud == refused


def test_running_out_of_file_descriptors_is_logged_once_and_survived(
    make_service: MakeService,
) -> None:
    soft, hard = 64, 160
    service = make_service(wrapper=["prlimit", f"--nofile={soft}:{hard}", "--"])
    with running(service):
        # Start-up raised the soft limit to the hard one.
        assert scrape_metric(service.url, "process_max_fds") == hard
        held: list[socket.socket] = []
        try:
            for _ in range(hard + 40):
                held.append(socket.create_connection(("127.0.0.1", service.port), timeout=5))

            def exhausted_logged() -> bool:
                events = json_log_lines(service.log())
                return any(e.get("event") == "fd-exhausted" for e in events)

            deadline = time.monotonic() + 10
            while not exhausted_logged():
                assert time.monotonic() < deadline, "running out of descriptors went unlogged"
                time.sleep(0.1)
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while True:  # the service takes connections again once the clients are gone
            try:
                if http_get(service.url + "/livez", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while (scrape_metric(service.url, "process_open_fds") or hard) >= hard * 0.9:
            assert time.monotonic() < deadline, "the closed connections' descriptors stay open"
            time.sleep(0.2)
    events = [e.get("event") for e in json_log_lines(service.log())]
    assert events.count("fd-exhausted") == 1
    assert events.count("fd-recovered") == 1


def test_a_path_cannot_forge_a_console_log_line(make_service: MakeService) -> None:
    service = make_service(LOG_FORMAT="console", ACCESS_LOG="true")
    forged = "12:00:00.000 ERROR   increment_service: forged"
    with running(service):
        path = "/nope%0a" + forged.replace(" ", "%20") + "%0d%0b%1b[31m"
        status, _ = http_get(service.url + path)
        assert status == 404
    lines = service.log().splitlines()
    assert not any(line.startswith("12:00:00.000") for line in lines)
    logged = [line for line in lines if "route=unmatched" in line]
    assert len(logged) == 1
    assert "\\x0a12:00:00.000" in logged[0]
    assert "\\x1b[31m" in logged[0]


def test_access_log_sample_logs_one_success_in_n_and_every_failure(
    make_service: MakeService,
) -> None:
    service = make_service(ACCESS_LOG="sample:4")
    with running(service):
        for n in range(12):
            body = json.dumps({"key": f"k{n}", "value": 1}).encode()
            answer = raw_exchange(
                service.port,
                b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            )
            assert answer.startswith(b"HTTP/1.1 202 ")
        for _ in range(3):
            assert http_get(service.url + "/nope")[0] == 404
    requests = [e for e in json_log_lines(service.log()) if e.get("event") == "request"]
    assert sorted(e["status"] for e in requests) == [202, 202, 202, 404, 404, 404]
