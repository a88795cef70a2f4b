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
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import embedded
from .settings import Settings, SettingsError

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
    with embedded.servers(settings) as settings:
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
            run_worker(settings)
            return 0
        return supervise(settings)


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


def run_worker(settings: Settings, worker: int = 0) -> None:
    """Serve one replica in this process until SIGTERM/SIGINT, then shut down gracefully.
    ``worker`` (0 to WORKERS - 1) staggers its flushes behind the other workers'."""
    import uvloop
    from aiohttp import web

    from .app import create_app
    from .appkeys import FLUSH_OFFSET
    from .logs import setup_logging

    setup_logging(settings)  # again: a spawned worker starts with a fresh interpreter
    log.info(
        "worker listening",
        extra={"event": "start", "host": settings.host, "port": settings.port, "pid": os.getpid()},
    )
    app = create_app(settings)
    app[FLUSH_OFFSET] = settings.flush_interval_seconds * worker / settings.workers
    app.on_startup.append(_settle_heap)  # after every cleanup_ctx has started
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=settings.workers > 1,
        shutdown_timeout=settings.request_drain_seconds,
        access_log=None,  # the observe middleware logs each request as JSON
        print=None,
        loop=uvloop.new_event_loop(),
    )


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


def supervise(settings: Settings) -> int:
    """Run WORKERS processes on one port. If one dies, stop the rest and exit non-zero, so
    the orchestrator restarts the replica set instead of running it short-handed."""
    directory = _prepare_multiprocess_dir()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_worker, args=(settings, n), name=f"worker-{n}")
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
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
    deadline = time.monotonic() + settings.shutdown_timeout_seconds + 5
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            log.error("worker did not stop in time; killing it", extra={"pid": worker.pid})
            worker.kill()
            worker.join()
        if worker.exitcode not in (0, -signal.SIGTERM):
            status = 1
    shutil.rmtree(directory, ignore_errors=True)
    return status
