"""The `increment-service` command: serve (default) or migrate."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import embedded
from .settings import Settings, SettingsError
from .shutdown import Deadline

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("increment_service")

#: Allocations between young collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="increment-service",
        description="Counters over HTTP, written behind to Postgres. Settings come from the "
        "environment (see the README); the options below override them.",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the service (the default)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (WORKERS)")
    serve.add_argument("--host", help="address to listen on (HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT)")
    sub.add_parser("migrate", help="apply the schema to DATABASE_URL and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        overrides = {
            name: getattr(args, name)
            for name in ("workers", "host", "port")
            if getattr(args, name, None) is not None
        }
        settings = dataclasses.replace(settings, **overrides)
    except SettingsError as exc:
        print(f"increment-service: configuration error: {exc}", file=sys.stderr)
        return 2

    from .logs import setup_logging

    setup_logging(settings)
    soft, hard = raise_fd_limit()
    log.info("open file limit", extra={"event": "start", "max_fds": soft, "hard_max_fds": hard})
    # The whole shutdown budget, from the SIGTERM this process gets to its exit; the workers
    # get theirs less what this process does after them (settings.worker_shutdown_seconds).
    deadline = Deadline(settings.shutdown_timeout_seconds)
    worker_budget = settings.worker_shutdown_seconds(
        embedded=settings.database_url is None or settings.redis_url is None
    )
    with embedded.servers(settings, deadline) as settings:
        assert settings.database_url is not None
        if args.command == "migrate":
            from .db import migrate_with_retry

            migrate_with_retry(settings.database_url)
            log.info("schema is up to date", extra={"event": "migrate"})
            return 0
        if settings.auto_migrate:
            from .db import migrate_with_retry

            migrate_with_retry(settings.database_url)
        if settings.workers == 1:
            run_worker(settings, budget=worker_budget, process=deadline)
            return 0
        return supervise(settings, deadline, worker_budget)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one (workers inherit it): every
    connection is a descriptor, and the usual soft default, 1024, is far below what a replica
    can serve. Returns the (soft, hard) limits in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # The kernel refuses more than fs.nr_open per process.
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit", extra={"error": str(exc)})
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_worker(
    settings: Settings,
    worker: int = 0,
    budget: float | None = None,
    process: Deadline | None = None,
) -> None:
    """Serve one replica in this process until SIGTERM/SIGINT, then shut down gracefully
    within ``budget`` seconds of the signal (the whole SHUTDOWN_TIMEOUT_SECONDS by default).
    ``worker`` (0 to WORKERS - 1) staggers its flushes behind the other workers'. ``process``:
    the deadline of the process (WORKERS=1: this one), fixed by the same signal."""
    import asyncio

    import uvloop

    from .app import create_app
    from .appkeys import FLUSH_OFFSET, SHUTDOWN
    from .logs import setup_logging

    setup_logging(settings)  # again: a spawned worker starts with a fresh interpreter
    log.info(
        "worker listening",
        extra={"event": "start", "host": settings.host, "port": settings.port, "pid": os.getpid()},
    )
    app = create_app(settings)
    app[FLUSH_OFFSET] = settings.flush_interval_seconds * worker / settings.workers
    app[SHUTDOWN] = Deadline(settings.shutdown_timeout_seconds if budget is None else budget)
    app.on_startup.append(_settle_heap)  # after every cleanup_ctx has started
    deadlines = [app[SHUTDOWN], *([process] if process is not None else [])]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, settings, deadlines))


async def _serve(app: web.Application, settings: Settings, deadlines: list[Deadline]) -> None:
    """aiohttp's run_app, but the signal fixes the shutdown's deadlines first: from then on
    every step of the shutdown consults them (lifecycle.py). The drain, aiohttp's own step,
    gets its share as a timeout (settings.drain_seconds)."""
    import asyncio

    from aiohttp import web

    from .appkeys import SHUTDOWN

    stopping = asyncio.Event()

    def stop() -> None:
        for deadline in deadlines:
            deadline.start()
        _watchdog(deadlines[-1])
        stopping.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.drain_seconds(app[SHUTDOWN].seconds),
        access_log=None,  # the observe middleware logs each request as JSON
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=settings.workers > 1)
        await site.start()
        await stopping.wait()
    finally:
        await runner.cleanup()


def _watchdog(deadline: Deadline) -> None:
    """The last resort: should a step of the shutdown not end by the process's deadline
    (every step consults it: this is for a bug), the process exits there, with status 1 and
    a line saying so, rather than be killed by the orchestrator without a word."""

    def watch() -> None:
        time.sleep(deadline.left())
        log.error(
            "shutdown overran its budget; exiting now",
            extra={"event": "shutdown-overrun", "pid": os.getpid()},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    if not any(t.name == "shutdown watchdog" for t in threading.enumerate()):
        threading.Thread(target=watch, name="shutdown watchdog", daemon=True).start()


async def _settle_heap(app: object) -> None:
    """Take what start-up made out of the garbage collector's scans, for good.

    Keyed requests keep objects alive until the next flush, and every few seconds that
    triggers a full collection, which walked the whole heap (Alembic, SQLAlchemy, aiohttp,
    the app: 110,000 objects, about 0.1 s with the event loop stopped). Objects made at
    start-up live as long as the process; frozen, a full collection walks only what was
    made since. A larger first generation makes the young collections, each a pause of its
    own, fewer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _prepare_multiprocess_dir() -> Path:
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="increment-metrics-"))
    # Files left by an earlier run would add its counts to this one's.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def supervise(settings: Settings, deadline: Deadline, worker_budget: float) -> int:
    """Run WORKERS processes on one port. If one dies, stop the rest and exit non-zero, so
    the orchestrator restarts the replica set instead of running it short-handed.

    SIGTERM fixes ``deadline`` (the whole budget) and is passed on: each worker has
    ``worker_budget`` from then on, which leaves this process the time to stop the embedded
    servers and exit. A worker still running when its budget is spent is killed."""
    directory = _prepare_multiprocess_dir()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_worker, args=(settings, n, worker_budget), name=f"worker-{n}")
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        deadline.start()
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while any(w.is_alive() for w in workers):
        time.sleep(0.2)
        if not stopping and any(not w.is_alive() for w in workers):
            log.error("a worker exited; stopping the others", extra={"event": "worker-exit"})
            status = 1
            stop(signal.SIGTERM, None)
        if stopping:
            break
    # What this process does after its workers: stop the embedded servers (if any), exit.
    after = settings.shutdown_timeout_seconds - worker_budget
    for worker in workers:
        worker.join(deadline.left(keep=after))
        if worker.is_alive():
            log.error(
                "worker did not stop within its shutdown budget; killing it",
                extra={"event": "shutdown-overrun", "pid": worker.pid},
            )
            worker.kill()
            worker.join()
        if worker.exitcode not in (0, -signal.SIGTERM):
            status = 1
    shutil.rmtree(directory, ignore_errors=True)
    return status
