"""What every part of a benchmark run shares: its configuration, the names of the systems it
drives, where its files are, and its progress log."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from tests.support.postgres import with_database

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LUA = BENCH_DIR / "increment.lua"

CEILING, SERVICE, SERVICE_LOG, SESSION, NAIVE = (
    "ceiling",
    "service",
    "service+log",
    "service+session",
    "naive",
)
SERVICE_SYSTEMS = (SERVICE, SERVICE_LOG, SESSION)
DEFAULT_FLUSH_INTERVAL = 2.0  # the service's default FLUSH_INTERVAL_SECONDS


@dataclasses.dataclass(frozen=True)
class Config:
    duration: int
    quick: bool
    out: Path
    postgres: str  # admin URL: databases are created and dropped through it
    database: str
    redis: str
    workers: tuple[int, ...]
    keys: tuple[int, ...]
    threads: int
    connections: int
    flush_sizes: tuple[int, ...]
    flush_repeats: int
    profile: bool
    service_pythonpath: str | None

    @property
    def database_url(self) -> str:
        return with_database(self.postgres, self.database)

    @property
    def flush_database_url(self) -> str:
        return with_database(self.postgres, self.database + "_flush")

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def drain(self) -> float:
        """Seconds at the end of each run whose requests go to the drain prefix."""
        return 1.0 if self.duration >= 4 else 0.5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
