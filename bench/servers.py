"""The servers a run drives, started side by side on free loopback ports: the bare and the
strict ceilings (bench/bare.py, bench/ceiling.py), the service (with and without its access
log) and the naive design (bench/naive.py); and the databases they count into."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
import asyncpg
import psutil
from tests.support.net import free_port, tcp_listeners

from bench.config import (
    BARE,
    BENCH_DIR,
    NAIVE,
    SERVICE,
    SERVICE_LOG,
    SERVICE_SYSTEMS,
    STRICT,
    Config,
)

SCRIPTS = {BARE: "bare.py", STRICT: "ceiling.py", NAIVE: "naive.py"}


@dataclasses.dataclass
class Server:
    system: str
    workers: int
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    ready_path: str | None  # GET answering 200 once the server can take traffic

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_service(self) -> bool:
        return self.system in SERVICE_SYSTEMS

    def worker_pids(self) -> list[int]:
        """The processes serving requests: the root itself with one worker, else its children
        (the service's spawned workers, or bench/minimal.py's worker processes)."""
        if self.workers == 1:
            return [self.process.pid]
        pids = []
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(child.cmdline()):
                    pids.append(child.pid)
        return pids

    def rss_mib(self) -> list[float]:
        sizes = []
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.Error):
                sizes.append(round(psutil.Process(pid).memory_info().rss / 2**20, 1))
        return sizes

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in {self.process.pid, *self.worker_pids()}:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(config: Config, system: str, workers: int) -> Server:
    port = free_port()
    name = f"{system.replace('+', '-')}-w{workers}"
    log_path = config.logs / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    ready_path: str | None = None
    if system in (SERVICE, SERVICE_LOG):
        env |= {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": str(workers),
            "DATABASE_URL": config.database_url,
            "REDIS_URL": config.redis,
            "ACCESS_LOG": "true" if system == SERVICE_LOG else "false",
            "LOG_FORMAT": "json",
            "REPLICA_ID": f"bench-{name}",
        }
        if config.service_pythonpath:
            env["PYTHONPATH"] = config.service_pythonpath
        command = [sys.executable, "-m", "increment_service", "serve"]
        ready_path = "/health"
    elif system in SCRIPTS:
        command = [sys.executable, str(BENCH_DIR / SCRIPTS[system])]
        command += ["--port", str(port), "--workers", str(workers)]
        if system == NAIVE:
            command += ["--database-url", config.database_url]
    else:
        raise ValueError(system)
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Server(system, workers, port, process, log_path, ready_path)


async def wait_ready(server: Server, session: aiohttp.ClientSession, within: float = 90) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.system} exited early; see {server.log_path}")
        if tcp_listeners(server.port) >= server.workers and len(server.worker_pids()) == (
            server.workers
        ):
            if server.ready_path is None:
                return
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(server.url + server.ready_path) as response:
                    if response.status == 200:
                        return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.system} not ready within {within}s; see {server.log_path}")


def migrate(database_url: str) -> None:
    """Apply the service's schema with its own command."""
    subprocess.run(
        [sys.executable, "-m", "increment_service", "migrate"],
        env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"},
        check=True,
        stdout=subprocess.DEVNULL,
    )


async def prepare_databases(config: Config) -> None:
    admin = await asyncpg.connect(config.postgres)
    try:
        for name in (config.database, config.database + "_flush"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await asyncio.to_thread(migrate, config.database_url)
    await asyncio.to_thread(migrate, config.flush_database_url)
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(config.redis)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@contextlib.contextmanager
def servers_for(
    config: Config, workers: int, systems: Sequence[str]
) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        for system in systems:
            servers[system] = start_server(config, system, workers)
        yield servers
    finally:
        for server in servers.values():
            server.stop()
