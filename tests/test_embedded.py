"""The embedded default: `increment-service` with no URLs runs real servers under DATA_DIR."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from increment_service import embedded
from tests.conftest import embedded_base
from tests.support.api import counter_via_api, signed_in
from tests.support.processes import ServiceProcess


def _socket_url(data_dir: Path) -> str:
    """The embedded Postgres's URL, read from its postmaster.pid (line 5: the socket dir)."""
    lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/postgres?host={lines[4].strip()}&port={lines[3].strip()}"


async def _increment(url: str, value: int) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/increment", json={"key": "kept", "value": value}) as r:
            status = r.status
        async with session.get(url + "/api/health") as r:
            assert r.status == 200, await r.text()
    return status


async def test_embedded_default_starts_persists_stops_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    data_dir = embedded_base() / "data"
    env = {
        "DATABASE_URL": "",  # unset: the embedded default
        "REDIS_URL": "",
        "DATA_DIR": str(data_dir),
        "FLUSH_INTERVAL_SECONDS": "0.2",
    }
    first = ServiceProcess(env, tmp_path / "first.log").start(timeout=120)
    try:
        assert await _increment(first.url, 5) == 202
    finally:
        assert first.stop() == 0
    log = first.log()
    assert '"msg":"embedded servers started"' in log
    assert '"servers":["postgres","redis"]' in log
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "Postgres was stopped"
    assert (data_dir / "redis" / "redis.rdb").exists(), "Redis saved its data"

    second = ServiceProcess(env, tmp_path / "second.log").start(timeout=120)
    try:
        assert await _increment(second.url, 3) == 202
        second.stop()
        # Stopped: start the same cluster once more, only to read it.
        third = ServiceProcess(env, tmp_path / "third.log").start(timeout=120)
        try:
            conn = await asyncpg.connect(_socket_url(data_dir))
            try:
                value = await conn.fetchval("SELECT value FROM counters WHERE key = 'kept'")
            finally:
                await conn.close()
        finally:
            third.stop()
    finally:
        second.stop()
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    assert value == 8, "the first run's increment survived the restart"


def unshare_pid_namespace() -> list[str]:
    """unshare's command for a new PID namespace, whose first process is PID 1 (as in a
    container without an init); skips where this machine does not allow one."""
    unshare, setsid = shutil.which("unshare"), shutil.which("setsid")
    if unshare is None or setsid is None:
        pytest.skip("unshare and setsid (util-linux) are needed")
    # A session of its own: a signal to its process group (kill(0, ...)) stays in there.
    command = [setsid, unshare, "--fork", "--pid", "--mount-proc"]
    probe = subprocess.run([*command, "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespace here: {probe.stderr.decode(errors='replace').strip()}")
    return command


def namespace_init(outer_pid: int) -> int:
    """The pid (as seen from here) of the process that unshare forked: PID 1 inside."""
    (child,) = Path(f"/proc/{outer_pid}/task/{outer_pid}/children").read_text().split()
    status = Path(f"/proc/{child}/status").read_text()
    ns_pids = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
    assert ns_pids[-1] == "1", ns_pids
    return int(child)


async def test_embedded_service_as_pid_1_stops_its_servers_and_exits_on_sigterm(
    tmp_path: Path,
) -> None:
    """PID 1 without an init: orphans (the postmaster) are its children and an exited one stays
    a zombie until it reaps it. SIGTERM must still end in exit 0 within seconds, with both
    servers stopped cleanly and their data kept."""
    wrapper = unshare_pid_namespace()
    data_dir = embedded_base() / "data"
    # SHUTDOWN_TIMEOUT_SECONDS, the contract's bound on the way out (at least 2 s above the
    # default DURABLE_TIMEOUT_SECONDS of 5).
    budget = 8
    env = {
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "DATA_DIR": str(data_dir),
        "SHUTDOWN_TIMEOUT_SECONDS": str(budget),
    }
    service = ServiceProcess(env, tmp_path / "pid1.log", wrapper=wrapper).start(timeout=120)
    try:
        cookie = await signed_in(service.url)
        assert await _increment(service.url, 5) == 202
        assert service.process is not None
        init = namespace_init(service.process.pid)
        sent = time.monotonic()
        os.kill(init, signal.SIGTERM)
        returncode = service.wait(30)
        took = time.monotonic() - sent
    finally:
        service.stop()
    assert returncode == 0, service.log()
    # The shutdown budget, plus 10 s of stated margin for the embedded servers' own stop on a
    # busy machine: what this catches is an exit that never comes (a zombie postmaster never
    # reaped), which service.wait's 30 s would turn into a failure anyway.
    assert took < budget + 10, f"SIGTERM to exit took {took:.1f}s"
    pg_log = (data_dir / "postgres" / "log").read_text()
    assert "received fast shutdown request" in pg_log
    assert "database system is shut down" in pg_log
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert '"level":"error"' not in service.log()

    # Started again (not as PID 1): the session was saved by Redis at its stop, the counter
    # by the final flush.
    again = ServiceProcess(env, tmp_path / "again.log").start(timeout=120)
    try:
        assert await counter_via_api(again.url, "kept", cookie) == 5
    finally:
        assert again.stop() == 0
        shutil.rmtree(data_dir.parent, ignore_errors=True)


# --- the stop helpers, on real processes ------------------------------------------------------


def test_wait_for_exit_reaps_its_children_and_waits_for_others() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not embedded.exited(child.pid)
        assert embedded.wait_for_exit(child.pid, 0.2) is False, "still running: times out"
        child.kill()
        assert embedded.wait_for_exit(child.pid, 10) is True
        assert embedded.exited(child.pid), "reaped by wait_for_exit: gone"
    finally:
        child.kill()
    # Not a child of this process: an orphan (its parent, the shell, has exited).
    shell = subprocess.run(
        ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True
    )
    orphan = int(shell.stdout)
    try:
        assert not embedded.exited(orphan)
        os.kill(orphan, signal.SIGKILL)
        assert embedded.wait_for_exit(orphan, 10) is True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_embedded_redis_that_cannot_start_says_why(tmp_path: Path) -> None:
    (tmp_path / "redis.rdb").write_bytes(b"not an RDB file")
    with pytest.raises(RuntimeError, match="exited at start") as failure:
        embedded.EmbeddedRedis(tmp_path).start()
    assert "Wrong signature trying to load DB" in str(failure.value), "the log tail is in it"


def test_embedded_redis_that_cannot_save_is_stopped_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis whose SHUTDOWN SAVE fails refuses to stop, by command and by SIGTERM alike (Redis
    6.2 keeps running rather than lose data); the last resort is SIGKILL, to that process."""
    monkeypatch.setattr(embedded, "STOP_TIMEOUT_SECONDS", 0.5)
    server = embedded.EmbeddedRedis(tmp_path).start()
    process = server.process
    assert process is not None
    (tmp_path / "redis.rdb").mkdir()  # the save's final rename fails onto a directory
    with caplog.at_level("WARNING", logger="increment_service.embedded"):
        server.stop()
    assert process.returncode == -signal.SIGKILL
    messages = [r.getMessage() for r in caplog.records]
    assert "embedded Redis refused SHUTDOWN SAVE" in messages
    assert messages.count("embedded Redis did not exit; signalling it") == 2
    assert not server.runtime.exists()
