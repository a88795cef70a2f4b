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

BARE, STRICT, SERVICE, SERVICE_LOG, SESSION, NAIVE = (
    "bare",  # bench/bare.py: orjson and two type checks, issue 12's reference
    "strict",  # bench/ceiling.py: the contract's strict parsing and validation
    "service",
    "service+log",
    "service+session",
    "naive",
)
CEILINGS = (BARE, STRICT)
SERVICE_SYSTEMS = (SERVICE, SERVICE_LOG, SESSION)
#: The order in which the systems of one worker count and key range are driven, one after the
#: other; the bare ceiling runs again at the end (BARE_AGAIN), so that the services, in the
#: middle, are compared with the mean of two measurements that bracket them, and the drift
#: between the two tells how much the machine's noise moved during the group.
ORDER = (BARE, STRICT, SERVICE, SERVICE_LOG, SESSION, NAIVE)
BARE_AGAIN = "bare-again"
#: The parts of a run, for --only.
PARTS = ("load", "openloop", "flush")
DEFAULT_FLUSH_INTERVAL = 2.0  # the service's default FLUSH_INTERVAL_SECONDS


@dataclasses.dataclass(frozen=True)
class Config:
    duration: int  # wrk seconds of the ceilings and the naive design
    steady: int  # wrk seconds of each service scenario: the freshness window
    quick: bool
    parts: tuple[str, ...]
    systems: tuple[str, ...]  # of ORDER, driven by the load part (bare includes bare-again)
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
    open_fractions: tuple[float, ...]  # of the service's wrk throughput at open_workers
    open_rates: tuple[float, ...]  # absolute rates instead, if given
    open_duration: float
    open_connections: int
    open_workers: int

    @property
    def database_url(self) -> str:
        return with_database(self.postgres, self.database)

    @property
    def flush_database_url(self) -> str:
        return with_database(self.postgres, self.database + "_flush")

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def seconds_for(self, system: str) -> int:
        return self.steady if system in SERVICE_SYSTEMS else self.duration

    @staticmethod
    def drain(seconds: int) -> float:
        """Seconds at the end of a wrk run whose requests go to the drain prefix."""
        return 1.0 if seconds >= 4 else 0.5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
