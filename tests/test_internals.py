"""Paths that traffic rarely takes: the supervisor losing a worker, migrations waiting for
Postgres, pruning, the 500 fallback, log formats. Each is caused for real."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import signal
import sys
import time
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from increment_service import appkeys, cli
from increment_service.app import create_app
from increment_service.db import migrate_with_retry
from increment_service.logs import ConsoleFormatter, JsonFormatter
from increment_service.metrics import Metrics
from increment_service.middleware import request_middleware
from increment_service.settings import Settings
from tests.support.inprocess import Client
from tests.support.net import free_port
from tests.support.processes import ServiceProcess


def test_supervisor_stops_every_worker_when_one_dies(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """WORKERS=2 and one worker is SIGKILLed: the supervisor stops the other (which flushes)
    and exits non-zero, so an orchestrator restarts the whole replica."""
    service = ServiceProcess(
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "WORKERS": "2"},
        tmp_path / "supervisor.log",
    ).start()
    try:
        assert service.process is not None
        supervisor = psutil.Process(service.process.pid)

        def workers() -> list[psutil.Process]:
            # multiprocessing's resource tracker is a child too; workers run spawn_main.
            return [
                c for c in supervisor.children() if "resource_tracker" not in " ".join(c.cmdline())
            ]

        deadline = time.monotonic() + 30
        while len(workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        first, second = workers()
        first.send_signal(signal.SIGKILL)
        assert service.wait(timeout=30) == 1
        assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
        assert "a worker exited; stopping the others" in service.log()
    finally:
        service.stop()


async def test_a_started_worker_leaves_its_start_up_objects_out_of_collections() -> None:
    threshold = gc.get_threshold()
    gc.unfreeze()
    try:
        await cli._settle_heap(object())
        # What existed at start-up is frozen: a full collection no longer walks it.
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_migrations_wait_for_postgres_then_give_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="increment_service.db")
    with pytest.raises(OSError, match=r"Connect call failed|Connection refused"):
        migrate_with_retry(f"postgresql://postgres@127.0.0.1:{free_port()}/none", timeout=1.5)
    # Each retry says so: the proof that it retried, rather than the time it took.
    retries = [r for r in caplog.records if r.getMessage().startswith("postgres not reachable")]
    assert retries, "it retried before giving up"
    assert all("Connect call failed" in str(r.__dict__["error"]) for r in retries)


async def test_old_batch_ids_are_pruned(client: Client, pg: asyncpg.Connection) -> None:
    await pg.execute(
        "INSERT INTO applied_batches VALUES ('gone', 1, now() - interval '25 hours'),"
        " ('kept', 1, now() - interval '23 hours')"
    )
    write_behind = client.app[appkeys.WRITE_BEHIND]
    await write_behind.flusher.maybe_prune()  # just started: not due for an hour
    rows = await pg.fetch("SELECT replica_id FROM applied_batches ORDER BY replica_id")
    assert [r["replica_id"] for r in rows] == ["gone", "kept"]
    write_behind.flusher.next_prune = time.monotonic()  # due now
    await write_behind.flusher.maybe_prune()
    rows = await pg.fetch("SELECT replica_id FROM applied_batches")
    assert [r["replica_id"] for r in rows] == ["kept"]


async def test_an_unexpected_error_is_a_500_problem_and_redirects_pass(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application(middlewares=[request_middleware(Metrics(), None)])
    app.router.add_get("/broken", broken)
    app.router.add_get("/moved", moved)
    client = await aiohttp_client(app)
    response = await client.get("/broken")
    assert response.status == 500
    assert response.content_type == "application/problem+json"
    body = await response.json(content_type=None)
    assert "a bug" not in str(body), "no internals leak to the client"
    assert any(r.exc_info for r in caplog.records), "the trace goes to the log"
    redirect = await client.get("/moved", allow_redirects=False)
    assert redirect.status == 302


def _record(exc: bool) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "hello %s", ("you",), exc_info)
    record.event = "flush"
    record.keys = 3
    return record


def test_json_log_lines_carry_the_extra_fields_and_the_trace() -> None:
    line = json.loads(JsonFormatter().format(_record(exc=True)))
    assert (line["msg"], line["level"], line["event"], line["keys"]) == (
        "hello you",
        "error",
        "flush",
        3,
    )
    assert "ValueError: boom" in line["exc"]


def test_console_log_lines_are_for_humans() -> None:
    text = ConsoleFormatter().format(_record(exc=True))
    first = text.splitlines()[0]
    assert "ERROR" in first
    assert "hello you event=flush keys=3" in first
    assert "ValueError: boom" in text


def test_console_lines_cannot_be_forged_with_control_characters() -> None:
    forged = "\n12:00:00.000 ERROR   x: forged\r\x1b[2K\x85\u2028"
    try:
        raise ValueError(forged)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "path %s", (forged,), exc_info)
    record.path = forged
    text = ConsoleFormatter().format(record)
    lines = text.split("\n")
    assert "\\x0a12:00:00.000" in lines[0]
    assert "\\x0d\\x1b[2K\\x85\\u2028" in lines[0]
    # The trace follows, every line of it indented: none can pass for a log line.
    assert len(lines) > 2
    assert all(line.startswith("  ") for line in lines[1:])
    assert not any(ch in text for ch in "\r\x1b\x85\u2028")


async def test_each_request_is_logged_once_as_json(
    aiohttp_client: AiohttpClient, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(dataclasses.replace(settings, access_log=True, log_level="INFO"))
    client = await aiohttp_client(app)
    await client.post("/increment", json={"key": "a", "value": 1}, headers={"X-Request-ID": "r-1"})
    await client.get("/api/counters/x")
    await client.close()  # shutdown writes what the sampler has not yet
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert [(r["method"], r["route"], r["status"]) for r in requests] == [
        ("POST", "/increment", 202),
        ("GET", "/api/counters/{key}", 401),
    ]
    assert requests[0]["request_id"] == "r-1"
    assert requests[0]["logger"] == "increment_service.access"
    assert requests[0]["duration"] >= 0


def test_access_log_is_off_above_info(settings: Settings) -> None:
    quiet = create_app(dataclasses.replace(settings, access_log=True, log_level="WARNING"))
    assert appkeys.ACCESS_LOG not in quiet


def test_every_module_imports_on_its_own_without_side_effects(tmp_path: Path) -> None:
    """No circular import hides behind the order app.py happens to import in (every module,
    those of the subpackages too), and importing starts nothing: no thread, no child process,
    no listening socket, no file, nothing printed."""
    import pkgutil
    import subprocess

    import increment_service

    names = [
        m.name
        for m in pkgutil.walk_packages(increment_service.__path__, "increment_service.")
        # __main__ runs the service; schema/ holds Alembic's scripts, which Alembic loads
        # under names of its own (env.py needs Alembic's context).
        if m.name != "increment_service.__main__"
        and not m.name.startswith("increment_service.schema")
    ]
    assert {
        "increment_service.validation.bodies",
        "increment_service.writebehind.aggregator",
    } <= set(names)
    probe = (
        "import importlib, os, sys, threading, psutil\n"
        "importlib.import_module(sys.argv[1])\n"
        "me = psutil.Process()\n"
        "print(threading.active_count(), len(me.children()),"
        " len([c for c in me.net_connections() if c.status == 'LISTEN']), sorted(os.listdir()))\n"
    )
    for name in names:
        result = subprocess.run(
            [sys.executable, "-c", probe, name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stderr == "", name
        assert result.stdout == "1 0 0 []\n", name
