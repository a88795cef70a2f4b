"""The embedded default: `increment-service` with no URLs runs real servers under DATA_DIR."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg

from tests.conftest import embedded_base
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
    assert value == 8, "the first run's increment survived the restart"
