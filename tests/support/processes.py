"""``increment-service`` run for real, in a subprocess, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tests.support.net import free_port


def wait_until_listening(
    process: subprocess.Popen[bytes], port: int, timeout: float, what: str, log: Callable[[], str]
) -> None:
    """Poll until 127.0.0.1:``port`` takes connections; fail, with ``log()``, if ``process``
    exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen within {timeout}s:\n{log()}") from None
            time.sleep(0.05)


def service_env(database_url: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DATA_DIR": str(tmp_path),
        "AUTO_MIGRATE": "false",  # the session database is migrated already
        **extra,
    }


class ServiceProcess:
    """``increment-service`` run for real, in a subprocess, on a free loopback port."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        port: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.wrapper = list(wrapper)  # a command the service runs under (e.g. prlimit ...)
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_FORMAT": "json",
            "ACCESS_LOG": "false",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "increment_service", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_listening(self.process, self.port, timeout, "the service", self.log)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class MakeService(Protocol):
    """The ``make_service`` fixture (conftest.py)."""

    def __call__(self, wrapper: Sequence[str] = (), **env: str) -> ServiceProcess: ...


@contextlib.contextmanager
def running(service: ServiceProcess) -> Iterator[ServiceProcess]:
    service.start()
    try:
        yield service
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()
