"""The benchmark of increment-service: one command, everything on loopback.

    python bench/run.py                 # the full run, 5 s per scenario (~4 minutes)
    python bench/run.py --quick         # a smoke run (~1 minute)
    python bench/run.py --duration 10 --out /tmp/bench

For each worker count (1 and 2) it starts, side by side on free loopback ports:

* ``ceiling``: bench/ceiling.py, aiohttp + uvloop doing only the edge work (no I/O);
* ``service``: ``increment-service`` with ACCESS_LOG=false;
* ``service+log``: ``increment-service`` with ACCESS_LOG=true (stdout to a log file);
* ``naive``: bench/naive.py, one UPSERT per request through an asyncpg pool;

then, for each key range (1, 1000, 100000 distinct keys), drives each of them in turn with wrk
and bench/increment.lua (interleaved, so a noisy neighbour hurts all of them alike), plus
``service+session`` (POST /api/increment with a session cookie) once the sessions feature is
there. For the service it samples /metrics every 100 ms (increment_persist_lag_seconds), sends
a probe increment every 100 ms and watches Postgres for it (the measured age of the oldest
unpersisted increment), and after the run checks that Postgres holds exactly what was
acknowledged. Then it times ``writebehind.apply_batch`` on 1k/10k/100k keys (bench/flush.py).

Results: <out>/results.json, <out>/results.md, <out>/throughput_p99.png; logs in <out>/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import asyncpg
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LUA = BENCH_DIR / "increment.lua"
sys.path.insert(0, str(BENCH_DIR))

from flush import FlushResult, migrate, run_flush_bench  # noqa: E402 -- needs the path above

CEILING, SERVICE, SERVICE_LOG, SESSION, NAIVE = (
    "ceiling",
    "service",
    "service+log",
    "service+session",
    "naive",
)
SERVICE_SYSTEMS = (SERVICE, SERVICE_LOG, SESSION)
DEFAULT_FLUSH_INTERVAL = 2.0  # the service's default FLUSH_INTERVAL_SECONDS
SAMPLE_EVERY = 0.1
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


# --- configuration -----------------------------------------------------------------------


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


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark increment-service against a ceiling and a naive design.",
    )
    parser.add_argument("--duration", type=float, default=5, help="seconds per scenario")
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 minute)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of a Postgres the bench may create databases on",
    )
    parser.add_argument("--database", default="bench", help="database to (re)create")
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    parser.add_argument("--keys", default=None, help="key ranges (default 1,1000,100000)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of the Python servers (slows them: figures are not "
        "comparable with an unprofiled run)",
    )
    parser.add_argument(
        "--service-pythonpath",
        help="PYTHONPATH for the service processes (e.g. a scratch copy's src/ to measure a "
        "change); the installed increment_service otherwise",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    duration = 2 if quick and args.duration == 5 else args.duration
    default_keys = "1000" if quick else "1,1000,100000"
    return Config(
        duration=max(2, math.ceil(duration)),  # wrk takes whole seconds
        quick=quick,
        out=args.out.resolve(),
        postgres=args.postgres,
        database=args.database,
        redis=args.redis,
        workers=tuple(int(w) for w in args.workers.split(",")),
        keys=tuple(int(k) for k in (args.keys or default_keys).split(",")),
        threads=args.threads,
        connections=args.connections,
        flush_sizes=(1_000, 10_000, 100_000),
        flush_repeats=1 if quick else 3,
        profile=args.profile,
        service_pythonpath=args.service_pythonpath,
    )


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (with reuse_port, one per worker)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


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
    elif system == CEILING:
        command = [sys.executable, str(BENCH_DIR / "ceiling.py")]
        command += ["--port", str(port), "--workers", str(workers)]
    elif system == NAIVE:
        command = [sys.executable, str(BENCH_DIR / "naive.py")]
        command += ["--port", str(port), "--workers", str(workers)]
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
        if listeners(server.port) >= server.workers and len(server.worker_pids()) == (
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


# --- measurements ------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[rank]


def metric_sum(exposition: str, name: str, reduce: str = "sum") -> float | None:
    """Sum (or max) of every series of ``name`` in a Prometheus text exposition."""
    values = []
    for line in exposition.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            with contextlib.suppress(ValueError):
                values.append(float(line.rsplit(" ", 1)[1]))
    if not values:
        return None
    return max(values) if reduce == "max" else sum(values)


async def scrape(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url + "/metrics") as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


def busy_jiffies() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / hz, total / hz


def self_and_children_cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


@dataclasses.dataclass
class Freshness:
    gauge_samples: int = 0
    gauge_max_s: float | None = None
    gauge_p99_s: float | None = None
    probes: int = 0
    probes_persisted: int = 0
    probe_delay_max_s: float | None = None  # ack -> visible in Postgres, per probe
    probe_delay_p99_s: float | None = None
    oldest_age_max_s: float | None = None  # age of the oldest unpersisted probe, sampled
    oldest_age_p99_s: float | None = None


class FreshnessWatch:
    """During a run: /metrics every 100 ms (the lag gauge) and a probe increment every 100 ms,
    whose arrival in Postgres is watched, giving the measured age of the oldest unpersisted
    increment."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, pool: Pool, probe_prefix: str
    ) -> None:
        self.session = session
        self.url = url
        self.pool = pool
        self.probe_prefix = probe_prefix
        self.gauge: list[float] = []
        self.acked: dict[str, float] = {}
        self.persisted: dict[str, float] = {}
        self.oldest_ages: list[float] = []
        self.load_done = asyncio.Event()
        self.all_done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._scrape_loop()),
            asyncio.create_task(self._probe_loop()),
            asyncio.create_task(self._watch_loop()),
        ]

    async def _scrape_loop(self) -> None:
        while not self.load_done.is_set():
            started = time.monotonic()
            text = await scrape(self.session, self.url)
            lag = metric_sum(text, "increment_persist_lag_seconds", "max") if text else None
            if lag is not None:
                self.gauge.append(lag)
            await asyncio.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))

    async def _probe_loop(self) -> None:
        n = 0
        while not self.load_done.is_set():
            started = time.monotonic()
            n += 1
            key = f"{self.probe_prefix}{n}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.post(
                    self.url + "/increment", json={"key": key, "value": 1}
                ) as response:
                    if response.status == 202:
                        self.acked[key] = time.monotonic()
            await asyncio.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))

    async def _watch_loop(self) -> None:
        while not self.all_done.is_set():
            started = time.monotonic()
            waiting = [k for k in self.acked if k not in self.persisted]
            if waiting:
                rows = await self.pool.fetch(
                    "SELECT key FROM counters WHERE key = ANY($1::text[])", waiting
                )
                seen = time.monotonic()
                for row in rows:
                    self.persisted[row["key"]] = seen
                waiting = [k for k in waiting if k not in self.persisted]
            now = time.monotonic()
            self.oldest_ages.append(max((now - self.acked[k] for k in waiting), default=0.0))
            await asyncio.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))

    @property
    def probes_settled(self) -> bool:
        return len(self.persisted) == len(self.acked)

    async def stop(self) -> Freshness:
        self.load_done.set()
        self.all_done.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        delays = [self.persisted[k] - t for k, t in self.acked.items() if k in self.persisted]
        return Freshness(
            gauge_samples=len(self.gauge),
            gauge_max_s=rounded(max(self.gauge, default=None)),
            gauge_p99_s=rounded(percentile(self.gauge, 99)),
            probes=len(self.acked),
            probes_persisted=len(self.persisted),
            probe_delay_max_s=rounded(max(delays, default=None)),
            probe_delay_p99_s=rounded(percentile(delays, 99)),
            oldest_age_max_s=rounded(max(self.oldest_ages, default=None)),
            oldest_age_p99_s=rounded(percentile(self.oldest_ages, 99)),
        )


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclasses.dataclass
class Correctness:
    acknowledged: int  # wrk's 202s attributed to the main phase (X-Request-ID echoed)
    persisted: int  # sum(counters.value) of the main phase's keys
    in_flight_at_stop: int  # main-phase requests wrk sent but never saw answered
    equal: bool
    waited_s: float  # after the run, until Postgres held everything (or the timeout)
    # Cross-check from the service's side: increments_total over the scenario against every
    # key the scenario touched (main, drain and probe keys).
    server_acknowledged: int | None
    server_persisted: int
    server_equal: bool | None


@dataclasses.dataclass
class ScenarioResult:
    system: str
    workers: int
    keys: int
    path: str
    status: str  # ok | skipped | failed
    note: str = ""
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    non_202: int = 0
    acked_202: int = 0
    rss_mib: list[float] = dataclasses.field(default_factory=list)
    cpu_cores: dict[str, float] = dataclasses.field(default_factory=dict)
    freshness: Freshness | None = None
    correctness: Correctness | None = None
    cpu_us_per_request: float | None = None  # server CPU time per completed request
    vs_ceiling: float | None = None  # throughput / the ceiling's (same workers and keys)
    cpu_vs_ceiling: float | None = None  # the ceiling's CPU per request / this one's
    vs_naive: float | None = None
    profile: str | None = None

    @property
    def label(self) -> str:
        return f"{self.system} w{self.workers} k{self.keys}"


# --- wrk ---------------------------------------------------------------------------------


async def run_wrk(
    config: Config, url: str, path: str, keys: int, prefix: str, cookie: str | None
) -> tuple[dict[str, Any], str]:
    main_seconds = config.duration - config.drain
    command = [
        "wrk",
        f"-t{config.threads}",
        f"-c{config.connections}",
        f"-d{config.duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        url + path,
        "--",
        f"keys={keys}",
        f"prefix={prefix}",
        f"path={path}",
        f"main_seconds={main_seconds}",
    ]
    if cookie:
        command.append(f"cookie={cookie}")
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed, text
    raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{text}")


# --- persistence checks ------------------------------------------------------------------

SUMS_SQL = """
SELECT
    coalesce(sum(value) FILTER (WHERE starts_with(key, $2)), 0)::bigint AS main,
    coalesce(sum(value), 0)::bigint AS everything
FROM counters
WHERE starts_with(key, $1)
"""


async def wait_persisted(
    pool: Pool,
    scenario_prefix: str,
    acknowledged: int,
    watch: FreshnessWatch,
    session: aiohttp.ClientSession,
    url: str,
    counted_before: float | None,
    within: float,
) -> tuple[int, int, int | None, float]:
    """Poll until Postgres holds what was acknowledged (client and server side) and every
    probe, or ``within`` seconds: (main sum, everything sum, server acknowledged, waited)."""
    started = time.monotonic()
    while True:
        row = await pool.fetchrow(SUMS_SQL, scenario_prefix, scenario_prefix + ":")
        assert row is not None
        main, everything = int(row["main"]), int(row["everything"])
        text = await scrape(session, url)
        counted = metric_sum(text, "increments_total") if text else None
        server = (
            None if counted is None or counted_before is None else round(counted - counted_before)
        )
        waited = time.monotonic() - started
        settled = main >= acknowledged and watch.probes_settled
        if server is not None:
            settled = settled and everything >= server
        if settled or waited > within:
            return main, everything, server, waited
        await asyncio.sleep(0.25)


# --- sessions ----------------------------------------------------------------------------


async def session_cookie(
    session: aiohttp.ClientSession, url: str, check_key: str
) -> tuple[str | None, str]:
    """Create a user and log in through the API: (Cookie header value, note). None and the
    reason when the sessions feature is not there (404/405) or does not work."""
    email = f"bench-{uuid.uuid4().hex[:16]}@example.com"
    credentials = {"email": email, "password": f"bench-{uuid.uuid4().hex}"}
    async with session.post(url + "/api/users", json=credentials) as response:
        if response.status in (404, 405):
            return None, (
                f"skipped: POST /api/users answered {response.status}; the sessions feature "
                "(users.py/sessions.py) has not landed in this build"
            )
        if response.status != 201:
            body = (await response.text())[:200]
            return None, f"skipped: POST /api/users answered {response.status}: {body}"
    async with session.post(url + "/api/sessions", json=credentials) as response:
        if response.status in (404, 405):
            return None, f"skipped: POST /api/sessions answered {response.status}"
        if response.status != 201:
            body = (await response.text())[:200]
            return None, f"skipped: POST /api/sessions answered {response.status}: {body}"
        cookie = "; ".join(f"{name}={morsel.value}" for name, morsel in response.cookies.items())
    if not cookie:
        return None, "skipped: POST /api/sessions set no cookie"
    async with session.post(
        url + "/api/increment",
        json={"key": check_key, "value": 1},
        headers={"Cookie": cookie},
    ) as response:
        if response.status != 202:
            body = (await response.text())[:200]
            return None, f"skipped: POST /api/increment with the cookie answered {response.status}"
    return cookie, f"logged in as {email}"


# --- profiling ---------------------------------------------------------------------------


def start_profilers(config: Config, server: Server, name: str) -> list[subprocess.Popen[bytes]]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    profiles = config.out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    processes = []
    for pid in server.worker_pids():
        output = profiles / f"{name}-{pid}.txt"
        command = [py_spy, "record", "--pid", str(pid), "--duration", str(config.duration)]
        command += ["--rate", "200", "--nonblocking", "--format", "raw", "-o", str(output)]
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return processes


def summarize_profile(paths: list[Path], top: int = 25) -> str:
    """Self and inclusive time per function from py-spy's collapsed stacks."""
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            self_time[frames[-1]] = self_time.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples\n", "## self time\n"]
    for frame, count in sorted(self_time.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    lines.append("\n## inclusive time\n")
    for frame, count in sorted(inclusive.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


# --- one scenario ------------------------------------------------------------------------


async def run_scenario(
    config: Config,
    run_id: str,
    server: Server,
    system: str,
    keys: int,
    pool: Pool,
    session: aiohttp.ClientSession,
    cookie: str | None = None,
) -> ScenarioResult:
    path = "/api/increment" if system == SESSION else "/increment"
    result = ScenarioResult(system, server.workers, keys, path, "ok")
    slug = system.replace("+", "-")
    prefix = f"{run_id}.{slug}.w{server.workers}.k{keys}"
    watch: FreshnessWatch | None = None
    counted_before: float | None = None
    if server.is_service:
        text = await scrape(session, server.url)
        counted_before = metric_sum(text, "increments_total") if text else None
        watch = FreshnessWatch(session, server.url, pool, f"{prefix}-probe:")
        watch.start()
    profilers = (
        start_profilers(config, server, f"{slug}-w{server.workers}-k{keys}")
        if (config.profile and system != NAIVE)
        else []
    )
    busy_before, _ = busy_jiffies()
    me_before, children_before = self_and_children_cpu()
    server_before = server.cpu_seconds()
    started = time.monotonic()
    try:
        stats, wrk_output = await run_wrk(config, server.url, path, keys, prefix, cookie)
    except BaseException:
        if watch is not None:
            await watch.stop()
        raise
    wall = time.monotonic() - started
    if watch is not None:
        watch.load_done.set()
    server_cpu = server.cpu_seconds() - server_before
    me_after, children_after = self_and_children_cpu()
    busy_after, _ = busy_jiffies()
    result.rss_mib = server.rss_mib()
    wrk_cpu = children_after - children_before
    bench_cpu = me_after - me_before
    result.cpu_cores = {
        "server": round(server_cpu / wall, 2),
        "wrk": round(wrk_cpu / wall, 2),
        "bench": round(bench_cpu / wall, 2),
        # Everything else, Postgres included: other people's work on a shared machine shows
        # here (for the ceiling, nothing of ours runs outside the first three).
        "other": round(
            max(0.0, (busy_after - busy_before) - server_cpu - wrk_cpu - bench_cpu) / wall, 2
        ),
    }
    (config.logs / f"wrk-{prefix}.txt").write_text(wrk_output)

    result.requests = int(stats["requests"])
    result.duration_s = stats["duration_us"] / 1e6
    result.rps = round(result.requests / result.duration_s, 1)
    if result.requests:
        result.cpu_us_per_request = round(server_cpu / result.requests * 1e6, 1)
    latency = stats["latency_us"]
    result.p50_ms = latency["p50"] / 1000
    result.p90_ms = latency["p90"] / 1000
    result.p99_ms = latency["p99"] / 1000
    result.max_ms = latency["max"] / 1000
    result.errors = {k: int(v) for k, v in stats["errors"].items() if v}
    result.non_202 = int(stats["non_202"])
    result.acked_202 = int(stats["acked_main"] + stats["acked_drain"] + stats["acked_other"])

    for profiler in profilers:
        profiler.wait(timeout=60)
    if profilers:
        name = f"{slug}-w{server.workers}-k{keys}"
        paths = sorted((config.out / "profiles").glob(f"{name}-*.txt"))
        summary = config.out / "profiles" / f"{name}.summary.txt"
        summary.write_text(summarize_profile(paths))
        result.profile = str(summary.relative_to(config.out))

    if watch is not None:
        acknowledged = int(stats["acked_main"])
        in_flight = int(stats["sent_main"]) - acknowledged
        if stats["acked_other"]:
            result.note = (
                f"{stats['acked_other']} 202s without an echoed X-Request-ID: the main/drain "
                "split is unknown, see the server-side check"
            )
        within = 3 * DEFAULT_FLUSH_INTERVAL + 10
        main, everything, server_acked, waited = await wait_persisted(
            pool, prefix, acknowledged, watch, session, server.url, counted_before, within
        )
        result.freshness = await watch.stop()
        result.correctness = Correctness(
            acknowledged=acknowledged,
            persisted=main,
            in_flight_at_stop=in_flight,
            equal=main == acknowledged,
            waited_s=round(waited, 2),
            server_acknowledged=server_acked,
            server_persisted=everything,
            server_equal=None if server_acked is None else server_acked == everything,
        )
    return result


# --- the whole run -----------------------------------------------------------------------


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
def servers_for(config: Config, workers: int) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        for system in (CEILING, SERVICE, SERVICE_LOG, NAIVE):
            servers[system] = start_server(config, system, workers)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def bench(config: Config) -> dict[str, Any]:
    run_id = "r" + dt.datetime.now(dt.UTC).strftime("%H%M%S") + uuid.uuid4().hex[:4]
    started = dt.datetime.now(dt.UTC)
    log(f"preparing databases {config.database} and {config.database}_flush")
    await prepare_databases(config)
    results: list[ScenarioResult] = []
    async with (
        client_session() as session,
        asyncpg.create_pool(config.database_url, min_size=1, max_size=2) as pool,
    ):
        for workers in config.workers:
            with servers_for(config, workers) as servers:
                log(f"starting servers with {workers} worker(s)")
                await asyncio.gather(*(wait_ready(s, session) for s in servers.values()))
                service = servers[SERVICE]
                cookie, session_note = await session_cookie(
                    session, service.url, f"{run_id}.session-check:{workers}"
                )
                log(f"session: {session_note}")
                for keys in config.keys:
                    for system in (CEILING, SERVICE, SERVICE_LOG, SESSION, NAIVE):
                        server = servers.get(system, service)
                        if system == SESSION and cookie is None:
                            skipped = ScenarioResult(
                                system, workers, keys, "/api/increment", "skipped"
                            )
                            skipped.note = session_note
                            results.append(skipped)
                            continue
                        try:
                            result = await run_scenario(
                                config, run_id, server, system, keys, pool, session, cookie
                            )
                        except Exception as exc:  # noqa: BLE001 -- report it, run the rest
                            result = ScenarioResult(system, workers, keys, "", "failed")
                            result.note = f"failed: {type(exc).__name__}: {exc}"[:500]
                            log(f"{result.label}: {result.note}")
                        else:
                            log(progress_line(result))
                        results.append(result)
    log(f"flush cost: apply_batch with {', '.join(map(str, config.flush_sizes))} keys")
    flush: list[FlushResult] = []
    flush_error = None
    try:
        flush = await run_flush_bench(
            config.flush_database_url, list(config.flush_sizes), config.flush_repeats
        )
    except Exception as exc:  # noqa: BLE001 -- the load figures are still worth writing
        flush_error = f"{type(exc).__name__}: {exc}"[:500]
        log(f"flush cost failed: {flush_error}")
    add_ratios(results)
    return {
        "meta": machine_info(config, run_id, started),
        "scenarios": [dataclasses.asdict(r) for r in results],
        "flush": [f.as_dict() for f in flush],
        "flush_error": flush_error,
        "targets": evaluate_targets(results, flush),
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress_line(r: ScenarioResult) -> str:
    line = f"{r.label:28} {r.rps:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms"
    if r.correctness is not None:
        c = r.correctness
        line += f"  acked {c.acknowledged} persisted {c.persisted} {'=' if c.equal else '!='}"
    if r.freshness is not None and r.freshness.oldest_age_max_s is not None:
        line += f"  oldest {r.freshness.oldest_age_max_s:.2f}s"
    return line + f"  cpu {r.cpu_cores}"


def add_ratios(results: list[ScenarioResult]) -> None:
    by = {(r.system, r.workers, r.keys): r for r in results if r.status == "ok"}
    for r in results:
        if r.status != "ok":
            continue
        ceiling = by.get((CEILING, r.workers, r.keys))
        naive = by.get((NAIVE, r.workers, r.keys))
        if ceiling and ceiling.rps:
            r.vs_ceiling = round(r.rps / ceiling.rps, 3)
        if ceiling and ceiling.cpu_us_per_request and r.cpu_us_per_request:
            r.cpu_vs_ceiling = round(ceiling.cpu_us_per_request / r.cpu_us_per_request, 3)
        if naive and naive.rps and r.system != NAIVE:
            r.vs_naive = round(r.rps / naive.rps, 2)


def machine_info(config: Config, run_id: str, started: dt.datetime) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "run_id": run_id,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit + ("+uncommitted src changes" if dirty else ""),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk_version.stdout + wrk_version.stderr).split(" Copyright")[0].strip(),
        "duration_s": config.duration,
        "quick": config.quick,
        "wrk_threads": config.threads,
        "wrk_connections": config.connections,
        "drain_s": config.drain,
        "flush_interval_s": DEFAULT_FLUSH_INTERVAL,
        "profiled": config.profile,
        "service_pythonpath": config.service_pythonpath,
    }


# --- targets -----------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_targets(
    results: list[ScenarioResult], flush: list[FlushResult]
) -> list[dict[str, Any]]:
    ok = [r for r in results if r.status == "ok"]
    targets: list[Target] = []

    def ratio_target(name: str, goal: float, rows: list[ScenarioResult], attr: str) -> None:
        values = [(r, getattr(r, attr)) for r in rows if getattr(r, attr) is not None]
        if not values:
            targets.append(Target(name, f">= {goal}", "not measured", None))
            return
        measured = ", ".join(f"w{r.workers} k{r.keys}: {v:.2f}" for r, v in values)
        targets.append(Target(name, f">= {goal}", measured, all(v >= goal for _, v in values)))

    service = [r for r in ok if r.system == SERVICE]
    ratio_target("/increment vs ceiling (ACCESS_LOG=false)", 0.8, service, "vs_ceiling")
    ratio_target(
        "/increment vs ceiling (ACCESS_LOG=true, informative)",
        0.8,
        [r for r in ok if r.system == SERVICE_LOG],
        "vs_ceiling",
    )
    ratio_target(
        "/increment vs ceiling in CPU per request (noise-robust, informative)",
        0.8,
        service,
        "cpu_vs_ceiling",
    )
    ratio_target(
        "/api/increment with a session vs ceiling",
        0.6,
        [r for r in ok if r.system == SESSION],
        "vs_ceiling",
    )
    ceilings = {(r.workers, r.keys): r for r in ok if r.system == CEILING}
    for keys, goal, name in ((1000, 4, "vs naive at 1000 keys"), (1, 10, "vs naive on 1 hot key")):
        rows = [r for r in service if r.keys == keys and r.vs_naive is not None]
        if not rows:
            targets.append(Target(name, f">= {goal}", "not measured", None))
            continue
        parts = []
        for r in rows:
            bound = ceilings.get((r.workers, r.keys))
            limit = f" (ceiling: {bound.vs_naive:.1f})" if bound and bound.vs_naive else ""
            parts.append(f"w{r.workers} k{r.keys}: {r.vs_naive:.2f}{limit}")
        met = all(r.vs_naive is not None and r.vs_naive >= goal for r in rows)
        targets.append(Target(name, f">= {goal}", ", ".join(parts), met))

    fresh = [r for r in ok if r.freshness is not None]
    for label, attr_p99, attr_max in (
        ("lag gauge", "gauge_p99_s", "gauge_max_s"),
        ("probe oldest-unpersisted age", "oldest_age_p99_s", "oldest_age_max_s"),
    ):
        p99s = [getattr(r.freshness, attr_p99) for r in fresh]
        maxes = [getattr(r.freshness, attr_max) for r in fresh]
        p99s = [v for v in p99s if v is not None]
        maxes = [v for v in maxes if v is not None]
        if p99s and maxes:
            targets.append(
                Target(
                    f"freshness ({label}): p99 < 3 s and max < 10 s",
                    "p99 < 3 s, max < 10 s",
                    f"worst p99 {max(p99s):.2f} s, worst max {max(maxes):.2f} s",
                    max(p99s) < 3 and max(maxes) < 10,
                )
            )
    checked = [r for r in ok if r.correctness is not None]
    if checked:
        bad = [r.label for r in checked if r.correctness and not r.correctness.equal]
        total = sum(r.correctness.acknowledged for r in checked if r.correctness)
        targets.append(
            Target(
                "acknowledged == persisted",
                "equal in every service scenario",
                f"{len(checked) - len(bad)}/{len(checked)} equal ({total} increments)"
                + (f"; differ: {', '.join(bad)}" if bad else ""),
                not bad,
            )
        )
    for f in flush:
        if f.keys == 100_000:
            targets.append(
                Target(
                    f"100k-key flush ({f.case})",
                    "< 1.5 s",
                    f"{f.median_s:.3f} s (median of {len(f.seconds)})",
                    f.median_s < 1.5,
                )
            )
    return [t.as_dict() for t in targets]


# --- reports -----------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def scenario_from_dict(row: dict[str, Any]) -> ScenarioResult:
    fields = dict(row)
    freshness, correctness = fields.pop("freshness"), fields.pop("correctness")
    result = ScenarioResult(**fields)
    result.freshness = Freshness(**freshness) if freshness else None
    result.correctness = Correctness(**correctness) if correctness else None
    return result


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    rows = [scenario_from_dict(r) for r in data["scenarios"]]
    out = [
        "# increment-service benchmark results",
        "",
        f"Run {meta['run_id']} at {meta['started']} on commit {meta['commit']}: "
        f"{meta['nproc']} x {meta['cpu_model']}, Python {meta['python']}, {meta['wrk']}; "
        f"wrk -t{meta['wrk_threads']} -c{meta['wrk_connections']}, {meta['duration_s']} s per "
        f"scenario{' (quick)' if meta['quick'] else ''}"
        f"{', PROFILED (py-spy attached: figures depressed)' if meta['profiled'] else ''}.",
        "Ratios are to the ceiling (and to the naive design) with the same worker count and key "
        "range, measured in this run with the scenarios interleaved. Client, servers and "
        "Postgres share the machine's cores; the `other` CPU column is everything not ours "
        "plus Postgres, so a noisy neighbour shows there. Server CPU per request (and its "
        "ratio to the ceiling's) depends much less on such noise than throughput does.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in data["targets"]:
        met = {True: "yes", False: "**NO**", None: "not measured"}[t["met"]]
        out.append(f"| {t['name']} | {t['goal']} | {t['measured']} | {met} |")
    out += [
        "",
        "## Throughput and latency (`POST /increment`, wrk)",
        "",
        "| system | workers | keys | req/s | p50 ms | p99 ms | max ms | vs ceiling | vs naive "
        "| server CPU us/req (vs ceiling) | non-202 / errors | RSS MiB per worker "
        "| CPU cores server / wrk / other |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.status != "ok":
            continue
        errors = sum(r.errors.values())
        cpu = r.cpu_cores
        out.append(
            f"| {r.system} | {r.workers} | {r.keys} | {r.rps:,.0f} | {fmt(r.p50_ms)} | "
            f"{fmt(r.p99_ms)} | {fmt(r.max_ms, '.0f')} | {fmt(r.vs_ceiling)} | "
            f"{fmt(r.vs_naive, '.1f', 'x')} | {fmt(r.cpu_us_per_request, '.0f')} "
            f"({fmt(r.cpu_vs_ceiling)}) | {r.non_202} / {errors} | "
            f"{', '.join(f'{m:.0f}' for m in r.rss_mib)} | "
            f"{cpu.get('server', 0):.2f} / {cpu.get('wrk', 0):.2f} / {cpu.get('other', 0):.2f} |"
        )
    out += [
        "",
        "## Write-behind: freshness and correctness (service scenarios)",
        "",
        "Lag gauge: `increment_persist_lag_seconds` scraped every 100 ms. Probe: one increment "
        "every 100 ms on a key of its own, Postgres polled every 100 ms; *oldest* is the age of "
        "the oldest acknowledged probe not yet in Postgres, sampled every 100 ms. Acked: wrk's "
        "202s in the main phase; persisted: sum(counters.value) of those keys after the flush "
        "window. Server check: the service's own `increments_total` over the scenario against "
        "every key it touched.",
        "",
        "| system | workers | keys | lag gauge p99 / max s | probe oldest p99 / max s | "
        "probe delay max s | acked (wrk 202) | persisted | equal | waited s | server acked / "
        "persisted |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        if r.status != "ok" or r.freshness is None or r.correctness is None:
            continue
        f, c = r.freshness, r.correctness
        server = (
            "-"
            if c.server_acknowledged is None
            else f"{c.server_acknowledged} / {c.server_persisted}"
            + (" =" if c.server_equal else " **!=**")
        )
        out.append(
            f"| {r.system} | {r.workers} | {r.keys} | {fmt(f.gauge_p99_s)} / "
            f"{fmt(f.gauge_max_s)} | {fmt(f.oldest_age_p99_s)} / {fmt(f.oldest_age_max_s)} | "
            f"{fmt(f.probe_delay_max_s)} | {c.acknowledged} | {c.persisted} | "
            f"{'yes' if c.equal else '**NO**'} | {c.waited_s:.1f} | {server} |"
        )
    out += [
        "",
        "## Flush cost (`writebehind.apply_batch`, one batch)",
        "",
        "| keys | case | seconds (median) | all runs | rows/s |",
        "| ---: | --- | ---: | --- | ---: |",
    ]
    for f in data["flush"]:
        runs = ", ".join(f"{s:.3f}" for s in f["seconds"])
        out.append(
            f"| {f['keys']:,} | {f['case']} | {f['median_s']:.3f} | {runs} | {f['rows_per_s']:,} |"
        )
    if data.get("flush_error"):
        out.append(f"\nThe flush benchmark failed: {data['flush_error']}")
    notes = [r for r in rows if r.note]
    if notes:
        out += ["", "## Notes", ""]
        seen = set()
        for r in notes:
            if (r.system, r.note) in seen:
                continue
            seen.add((r.system, r.note))
            out.append(f"- {r.system}: {r.note}")
    return "\n".join(out) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["scenarios"] if r["status"] == "ok"]
    systems = [
        s
        for s in (CEILING, SERVICE, SERVICE_LOG, SESSION, NAIVE)
        if any(r["system"] == s for r in rows)
    ]
    groups = sorted({(r["workers"], r["keys"]) for r in rows})
    by = {(r["system"], r["workers"], r["keys"]): r for r in rows}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        rps = [by.get((system, w, k), {}).get("rps", 0) for w, k in groups]
        p99 = [by.get((system, w, k), {}).get("p99_ms") or 0 for w, k in groups]
        top.bar(xs, rps, width, label=system)
        bottom.bar(xs, p99, width, label=system)
    top.set_ylabel("requests/s")
    top.set_title("POST /increment throughput (wrk) — higher is better")
    top.legend(ncol=len(systems), fontsize="small")
    bottom.set_ylabel("p99 latency, ms")
    bottom.set_title("p99 latency — lower is better")
    bottom.set_xticks(range(len(groups)))
    bottom.set_xticklabels(
        [f"{w} worker{'s' if w > 1 else ''}\n{k:,} key{'s' if k > 1 else ''}" for w, k in groups]
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    config.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(config.logs, ignore_errors=True)
    config.logs.mkdir(parents=True)
    if config.profile:
        shutil.rmtree(config.out / "profiles", ignore_errors=True)
    data = asyncio.run(bench(config))
    (config.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    report = markdown(data)
    (config.out / "results.md").write_text(report)
    plot(data, config.out / "throughput_p99.png")
    print(report)
    met = [t["met"] for t in data["targets"]]
    log(
        f"targets met: {met.count(True)}, missed: {met.count(False)}, "
        f"not measured: {met.count(None)}; results in {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
