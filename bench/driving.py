"""Driving one scenario: wrk against a server and, for the service, what it promises under
that load: the freshness watch (the lag gauge, and probe increments watched in Postgres) and
the correctness check (acknowledged == persisted); the CPU it took; py-spy profiles on demand
(bench/profiling.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import resource
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import aiohttp
import asyncpg

from bench import openloop
from bench.config import DEFAULT_FLUSH_INTERVAL, LUA, NAIVE, SESSION, Config
from bench.openloop import percentile
from bench.profiling import finish_profiles, start_profilers
from bench.servers import Server

SAMPLE_EVERY = 0.1
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


def metric_sum(exposition: str, name: str, reduce: str = "sum") -> float | None:
    """Sum (or max) of every series of ``name`` in a Prometheus text exposition.

    A line scan, not the tests' metric_value (prometheus_client's parser): it runs every
    100 ms beside the load, and the parser costs 70 times as much CPU (2 ms a scrape here)."""
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
    # Throughput over the bare ceiling's (the mean of its two runs bracketing the group) and
    # over the strict ceiling's, same workers and keys; then the same in CPU per request (the
    # ceiling's CPU per request over this one's).
    vs_bare: float | None = None
    vs_strict: float | None = None
    cpu_vs_bare: float | None = None
    cpu_vs_strict: float | None = None
    vs_naive: float | None = None
    profile: str | None = None

    @property
    def label(self) -> str:
        return f"{self.system} w{self.workers} k{self.keys}"


async def run_wrk(
    config: Config,
    url: str,
    path: str,
    keys: int,
    prefix: str,
    cookie: str | None,
    seconds: int,
) -> tuple[dict[str, Any], str]:
    main_seconds = seconds - config.drain(seconds)
    command = [
        "wrk",
        f"-t{config.threads}",
        f"-c{config.connections}",
        f"-d{seconds}s",
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
    seconds = config.seconds_for(system)
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
        start_profilers(config, server, f"{slug}-w{server.workers}-k{keys}", seconds)
        if (config.profile and system != NAIVE)
        else []
    )
    busy_before, _ = busy_jiffies()
    me_before, children_before = self_and_children_cpu()
    server_before = server.cpu_seconds()
    started = time.monotonic()
    try:
        stats, wrk_output = await run_wrk(config, server.url, path, keys, prefix, cookie, seconds)
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

    if profilers:
        result.profile = finish_profiles(config, f"{slug}-w{server.workers}-k{keys}", profilers)

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


async def wrk_throughput(config: Config, server: Server, keys: int, prefix: str) -> float:
    """Requests/s of a plain wrk run of POST /increment (no freshness watch, no checks)."""
    stats, _ = await run_wrk(config, server.url, "/increment", keys, prefix, None, config.duration)
    return float(stats["requests"]) / (float(stats["duration_us"]) / 1e6)


async def run_open_loop(
    config: Config,
    server: Server,
    system: str,
    rate: float,
    prefix: str,
    cookie: str | None,
) -> dict[str, Any]:
    """One fixed-rate run (bench/openloop.py) of POST /increment or, for the session system,
    POST /api/increment with the cookie: ``config.open_duration`` seconds, 1,000 keys."""
    path = "/api/increment" if system == SESSION else "/increment"
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    plan = openloop.Plan(
        server.url,
        path,
        rate,
        config.open_duration,
        body=functools.partial(openloop.increment_body, prefix=prefix, keys=1000),
        headers=headers,
        connections=config.open_connections,
        warmup=min(2.0, config.open_duration / 4),
    )
    server_before = server.cpu_seconds()
    started = time.monotonic()
    result = await openloop.run(plan)
    server_cores = (server.cpu_seconds() - server_before) / (time.monotonic() - started)
    return {
        "system": system,
        "workers": server.workers,
        "server_cpu_cores": round(server_cores, 2),
        **result.as_dict(),
    }


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session
