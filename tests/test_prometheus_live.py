"""A real Prometheus scraping a real two-worker service under traffic.

The module starts, once, `increment-service` with ``WORKERS=2`` and the Prometheus of this
machine with the repository's own scrape job (``increment-service``, its DNS discovery replaced
by a static target on loopback) and rule files, scraping and evaluating every second. It sends
a paced mix of traffic (increments over a few hundred keys, 422s, 404s, health checks, a user,
logins and session lookups when the service has those routes), then checks through
Prometheus' HTTP API that:

- every query of every dashboard panel returns data, with Grafana's variables substituted;
- the counters are exact across workers: what Prometheus scraped equals what the client saw,
  request by request, and both workers really served increments;
- ``promtool check metrics`` accepts ``/metrics``;
- every recording rule produces data, every rule evaluates without error, no alert fires in
  this healthy scenario and none is even pending but the latency ones (MAY_BE_PENDING).

Skipped only when Prometheus is not installed. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.load import Traffic
from tests.support.metrics import metric_value
from tests.support.monitoring import (
    PROMETHEUS_CONFIG,
    iter_panels,
    load_dashboard,
    rule_files,
    substitute,
)
from tests.support.monitoring import (
    dashboard_queries as rules_dashboard_queries,
)
from tests.support.net import free_port, tcp_listeners
from tests.support.processes import ServiceProcess

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = [
    pytest.mark.skipif(
        not Path(PROMETHEUS).exists(),
        reason="Prometheus is not installed (apt-get install prometheus, or put the "
        "prometheus binary of a release on PATH)",
    ),
    # The module's fixture (service, Prometheus, ~18 s of traffic) is set up in the first test.
    pytest.mark.timeout(120),
]

JOB = "increment-service"  # the job name of prometheus/prometheus.yml
SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "15s"  # what $__rate_interval becomes: 15 scrapes
TRAFFIC_SECONDS = 18.0  # longer than RATE_INTERVAL, so every rate window is full of traffic
TICK_SECONDS = 0.25
INCREMENTS_PER_TICK = 48  # 72 ticks: 3456 increments
KEYS = 300
SESSION_POLL_SECONDS = 0.2  # under the session cache's 1 s TTL: lookups both hit and miss

# Panels whose queries may return no series in this scenario, with the reason. Every metric
# the dashboard shows exists here (zero-valued counters such as backpressure, overflow and
# flush failures are data), so this stays empty while the service has its session routes.
EXEMPT_PANELS: dict[str, str] = {}
# Exempt only when the service has no POST /api/sessions (checked in /api/openapi.json):
# without logins there are neither login outcomes nor session lookups to count.
SESSION_PANELS: dict[str, str] = {
    "Logins by outcome": "no login route: session_logins_total has no series",
    "Session cache hit ratio": "no login route: no session lookup, the ratio is 0/0",
}
# No alert may fire in the healthy scenario, and none may even be pending (its condition true,
# which is what a run this short can see of the alerts with a `for`) except these.
MAY_BE_PENDING: dict[str, str] = {
    "HighP99Latency": "its p99 of a route with few requests (six health checks) is their "
    "slowest: one slowed past 250 ms by a loaded test machine makes it pending; firing "
    "takes 10 m of that",
    "HighP99LatencyAuthRoutes": "the same over the two logins (bcrypt is slow by design)",
}


# --- Prometheus ---------------------------------------------------------------------------


class PrometheusError(AssertionError):
    pass


class Prometheus:
    """The prometheus binary of this machine on a free loopback port, data in a temp dir."""

    def __init__(self, config: Path, directory: Path, port: int) -> None:
        self.config = config
        self.directory = directory
        self.port = port
        self.log_path = directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited early:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response,  # noqa: S310 -- loopback http
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: the `data` of a successful answer, else PrometheusError."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 -- loopback http
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422/503 carry an error body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result as a list of {metric, value} (scalars wrapped)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that returns one series (None if it returns none)."""
        result = self.query(expr, at)
        assert len(result) <= 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, ok: Callable[[float], bool], within: float, what: str) -> float:
        """Poll ``expr`` (one series) until ``ok(value)``; returns that value."""
        deadline = time.monotonic() + within
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last is not None and ok(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"{what}: {expr} is {last} after {within}s\n{self.log()[-3000:]}")


def scrape_config(service_target: str, prometheus_target: str) -> dict[str, Any]:
    """prometheus/prometheus.yml with the DNS discovery of the service replaced by a static
    target, the repository's rule files by absolute path, and everything every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(
        scrape_interval=SCRAPE_INTERVAL,
        scrape_timeout=SCRAPE_INTERVAL,
        evaluation_interval=SCRAPE_INTERVAL,
    )
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    jobs: list[dict[str, Any]] = []
    for job in config["scrape_configs"]:
        if job["job_name"] == JOB:
            assert "dns_sd_configs" in job, "prometheus.yml discovers the service otherwise"
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [service_target]}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [prometheus_target]}]
        else:  # pragma: no cover -- a job this test does not know cannot be reached here
            continue
        jobs.append(job)
    assert JOB in {job["job_name"] for job in jobs}, f"no job {JOB} in {PROMETHEUS_CONFIG}"
    config["scrape_configs"] = jobs
    return config


# --- the traffic --------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """What the client saw, by (method, route template, status), plus what it must not see."""

    responses: Counter[tuple[str, str, int]] = dataclasses.field(default_factory=Counter)
    acknowledged: int = 0  # 202s to POST /increment
    seconds: float = 0.0  # how long the increments took to send
    errors: int = 0  # connection failures
    logins: bool = False  # the session routes exist and were used
    surprises: list[str] = dataclasses.field(default_factory=list)

    def saw(self, method: str, route: str, status: int, expected: set[int]) -> None:
        self.responses[(method, route, status)] += 1
        if status not in expected:
            self.surprises.append(f"{method} {route}: {status}, expected {sorted(expected)}")


async def request(
    session: aiohttp.ClientSession,
    tally: Tally,
    method: str,
    url: str,
    route: str,
    expected: set[int],
    **kwargs: Any,
) -> int:
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        tally.saw(method, route, response.status, expected)
        return response.status


async def has_session_routes(base: str, tally: Tally) -> bool:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/api/openapi.json") as response,
    ):
        tally.saw("GET", "/api/openapi.json", response.status, {200})
        paths = (await response.json())["paths"]
    return "post" in paths.get("/api/users", {}) and "post" in paths.get("/api/sessions", {})


async def session_user(base: str, run: str, stop: asyncio.Event, tally: Tally) -> None:
    """Sign up, fail a login, log in, then read the session and counters until stopped (over one
    keep-alive connection, so one worker's cache both hits and misses), and log out."""
    # The login limits count per account and per client address in Redis, which other test
    # sessions share on this machine's server: a fresh email and, through the trusted-proxy
    # header, a fresh address keep this run's budget its own.
    octets = uuid.uuid4().bytes
    headers = {"X-Forwarded-For": f"198.18.{octets[0]}.{octets[1]}"}
    credentials = {"email": f"prom-live-{run}@example.com", "password": "correct horse battery"}
    connector = aiohttp.TCPConnector(limit=1)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies from 127.0.0.1
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=jar, timeout=timeout, headers=headers
    ) as session:
        await request(
            session, tally, "POST", base + "/api/users", "/api/users", {201}, json=credentials
        )
        wrong = {**credentials, "password": "not the password"}
        await request(
            session, tally, "POST", base + "/api/sessions", "/api/sessions", {401}, json=wrong
        )
        await request(
            session, tally, "POST", base + "/api/sessions", "/api/sessions", {201}, json=credentials
        )
        tally.logins = True
        # With TEST_BACKEND=local the Redis database is shared with the other test sessions of
        # this machine, whose fixtures empty it: the session may vanish under this user, and
        # the guarded routes answer 401 from then on. Either way each lookup is counted.
        guarded = {401}
        counter_route = "/api/counters/{key}"
        n = 0
        while not stop.is_set():
            await request(
                session, tally, "GET", base + "/api/sessions", "/api/sessions", {200, *guarded}
            )
            if n % 5 == 0:  # a key of this run (404 until its first flush), and one never sent
                await request(
                    session, tally, "GET", f"{base}/api/counters/{key(run, n)}", counter_route,
                    {200, 404, *guarded},
                )  # fmt: skip
                await request(
                    session, tally, "GET", f"{base}/api/counters/{run}-never", counter_route,
                    {404, *guarded},
                )  # fmt: skip
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SESSION_POLL_SECONDS)
        await request(session, tally, "DELETE", base + "/api/sessions", "/api/sessions", {204})
        await request(session, tally, "GET", base + "/api/sessions", "/api/sessions", {401})


def key(run: str, n: int) -> str:
    return f"prom-live-{run}-{n % KEYS}"


async def drive(base: str, run: str) -> Tally:
    """TRAFFIC_SECONDS of paced traffic: increments every tick, a 422 and a 404 every
    fourth tick, a health check every 3 s, and a logged-in user alongside."""
    tally = Tally()
    with_sessions = await has_session_routes(base, tally)
    stop = asyncio.Event()
    user = asyncio.create_task(session_user(base, run, stop, tally)) if with_sessions else None
    ticks = round(TRAFFIC_SECONDS / TICK_SECONDS)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as misc:
        for tick in range(ticks):
            first = tick * INCREMENTS_PER_TICK
            items = [(key(run, n), n % 7 - 2) for n in range(first, first + INCREMENTS_PER_TICK)]
            # A new client per tick: new connections, which the kernel spreads over both
            # workers' listening sockets (reuse_port).
            statuses = (await Traffic(base, items, concurrency=8).run()).statuses()
            tally.errors += statuses.pop(None, 0)  # no answer: counted apart
            for status, count in statuses.items():
                assert status is not None  # popped above
                tally.responses[("POST", "/increment", status)] += count
                if status != 202:
                    tally.surprises.append(f"POST /increment: {count} x {status}")
            tally.acknowledged += statuses[202]
            if tick % 4 == 0:
                bad = {"key": key(run, tick), "value": "one"}
                await request(
                    misc, tally, "POST", base + "/increment", "/increment", {422}, json=bad
                )
                await request(misc, tally, "GET", f"{base}/no-such-page/{tick}", "unmatched", {404})
            if tick % 4 == 1:  # a durable increment, and a keyed one sent twice (one replay)
                one = {"key": key(run, tick), "value": 1}
                durable = {"Prefer": "durable"}
                await request(
                    misc, tally, "POST", base + "/increment", "/increment", {204},
                    json=one, headers=durable,
                )  # fmt: skip
                keyed = {"Idempotency-Key": f"{run}-{tick}"}
                for _ in range(2):
                    await request(
                        misc, tally, "POST", base + "/increment", "/increment", {202},
                        json=one, headers=keyed,
                    )  # fmt: skip
                tally.acknowledged += 2  # the durable one, and the keyed one once
            if tick % 12 == 0:
                await request(misc, tally, "GET", base + "/api/health", "/api/health", {200})
            await asyncio.sleep(max(0.0, started + (tick + 1) * TICK_SECONDS - time.monotonic()))
        tally.seconds = time.monotonic() - started
        stop.set()
        if user is not None:
            await user
    return tally


async def fetch_metrics(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def increments_per_worker(directory: Path) -> dict[int, float]:
    """``increments_total`` of each worker, from the file its sampler writes (localmetrics)."""
    result: dict[int, float] = {}
    for path in sorted(directory.glob("local-*.json")):
        pid = int(path.stem.rsplit("-", 1)[1])
        rows = json.loads(path.read_text())["increments"]
        result[pid] = sum(value for _labels, value in rows)
    return result


# --- the scenario -------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    prometheus: Prometheus
    service: ServiceProcess
    instance: str
    tally: Tally
    at: float  # Unix time every query is evaluated at: just after the last scrape of traffic
    exposition: str  # /metrics after the traffic
    per_worker: dict[int, float]  # increments_total in each worker's own file


@pytest.fixture(scope="module")
def scenario(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("prometheus-live")
    run = uuid.uuid4().hex[:8]
    multiproc = tmp / "multiproc"
    service = ServiceProcess(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DATA_DIR": str(tmp / "data"),
            "WORKERS": "2",
            "FLUSH_INTERVAL_SECONDS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "TRUSTED_PROXIES": "127.0.0.1",  # the session user's X-Forwarded-For is believed
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "DURABLE_TIMEOUT_SECONDS": "2",
        },
        tmp / "service.log",
    )
    instance = f"127.0.0.1:{service.port}"
    prometheus_port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(scrape_config(instance, f"127.0.0.1:{prometheus_port}")), encoding="utf-8"
    )
    prometheus = Prometheus(config, tmp, prometheus_port)
    try:
        service.start()
        prometheus.start()
        deadline = time.monotonic() + 30
        while tcp_listeners(service.port) < 2:  # both workers take connections
            assert time.monotonic() < deadline, f"one worker listens:\n{service.log()}"
            time.sleep(0.1)
        up = f'up{{job="{JOB}",instance="{instance}"}}'
        prometheus.wait_for(up, lambda v: v == 1, 15, "the service is scraped")

        tally = asyncio.run(drive(service.url, run))
        traffic_ended = time.time()
        # Every counter is final before its response is sent: a scrape that started after
        # the last response has them all.
        prometheus.wait_for(
            f"timestamp({up})", lambda t: t > traffic_ended, 10, "a scrape after the traffic"
        )
        at = time.time()
        exposition = asyncio.run(fetch_metrics(service.url))
        per_worker = increments_per_worker(multiproc)
        yield Scenario(prometheus, service, instance, tally, at, exposition, per_worker)
    finally:
        prometheus.stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()


def test_traffic_went_as_planned(scenario: Scenario) -> None:
    tally = scenario.tally
    assert tally.errors == 0, scenario.service.log()[-3000:]
    assert tally.surprises == []
    ticks = round(TRAFFIC_SECONDS / TICK_SECONDS)
    # Each tick's increments, and every fourth tick a durable one and a keyed one (sent twice).
    assert tally.acknowledged == ticks * INCREMENTS_PER_TICK + 2 * len(range(1, ticks, 4))
    statuses = {status for _, _, status in tally.responses}
    assert {202, 204, 404, 422, 200} <= statuses
    # Enough samples for every rate window the dashboard and the rules use.
    up = f'up{{job="{JOB}",instance="{scenario.instance}"}}'
    samples = scenario.prometheus.value(f"count_over_time({up}[{RATE_INTERVAL}])", scenario.at)
    assert samples is not None
    assert samples >= 12


# --- 1. the dashboard -----------------------------------------------------------------------


def panel_queries(substitutions: dict[str, str]) -> list[tuple[str, str, str]]:
    """(panel title, refId, query) for every query of the dashboard, variables substituted."""
    queries = [
        (panel.get("title", ""), target.get("refId", ""), substitute(target["expr"], substitutions))
        for panel in iter_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    # The same queries test_prometheus_rules hands to live tests.
    assert [q for _, _, q in queries] == rules_dashboard_queries(substitutions)
    return queries


def finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


def test_every_dashboard_panel_has_data(scenario: Scenario) -> None:
    prometheus = scenario.prometheus
    # The template variables resolve to this job and this replica.
    jobs = prometheus.api("label/job/values", **{"match[]": "increments_total"})
    assert JOB in jobs
    instances = prometheus.api(
        "label/instance/values", **{"match[]": f'increments_total{{job=~"{JOB}"}}'}
    )
    assert instances == [scenario.instance]

    substitutions = {"__rate_interval": RATE_INTERVAL, "job": JOB, "instance": scenario.instance}
    exempt = dict(EXEMPT_PANELS)
    if not scenario.tally.logins:
        exempt.update(SESSION_PANELS)
    queries = panel_queries(substitutions)
    assert len(queries) >= 19
    titles = {title for title, _, _ in queries}
    assert set(exempt) <= titles, f"exemptions for panels that do not exist: {set(exempt) - titles}"

    empty = []
    for title, ref, query in queries:
        result = prometheus.query(query, scenario.at)
        if title in exempt:
            continue
        if not finite(result):
            empty.append(f"{title} [{ref}]: {query}\n    -> {result}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)

    # Panels whose value the scenario fixes.
    by_title = {(title, ref): query for title, ref, query in queries}
    assert prometheus.value(by_title[("Replicas up", "A")], scenario.at) == 1  # one target
    assert prometheus.value(by_title[("5xx ratio", "A")], scenario.at) == 0
    increments_rate = prometheus.value(by_title[("Increments /s", "A")], scenario.at)
    assert increments_rate is not None
    # The rate the client sent at; the window ends a second or two after the traffic.
    sent_rate = scenario.tally.acknowledged / scenario.tally.seconds
    assert 0.6 * sent_rate < increments_rate < 1.25 * sent_rate


# --- 2. exact totals across workers -------------------------------------------------------


def test_totals_are_exact_across_workers(scenario: Scenario) -> None:
    prometheus, tally, at = scenario.prometheus, scenario.tally, scenario.at
    selector = f'job="{JOB}",instance="{scenario.instance}"'
    assert prometheus.value(f"sum(increments_total{{{selector}}})", at) == tally.acknowledged
    acked = (
        f'http_request_duration_seconds_count{{{selector},route="/increment",status_code="202"}}'
    )
    assert prometheus.value(f"sum({acked})", at) == tally.acknowledged

    # Every response the client got is counted once, by method, route template and status
    # (/metrics aside: Prometheus' own scrapes count there).
    result = prometheus.query(
        "sum by (method, route, status_code) "
        f'(http_request_duration_seconds_count{{{selector},route!="/metrics"}})',
        at,
    )
    scraped = {
        (s["metric"]["method"], s["metric"]["route"], int(s["metric"]["status_code"])): float(
            s["value"][1]
        )
        for s in result
    }
    assert scraped == {k: float(v) for k, v in tally.responses.items()}

    # Both workers served increments, and the scrape added up their files.
    assert len(scenario.per_worker) == 2, scenario.per_worker
    assert all(count > 0 for count in scenario.per_worker.values()), scenario.per_worker
    assert sum(scenario.per_worker.values()) == tally.acknowledged
    assert metric_value(scenario.exposition, "increments_total") == tally.acknowledged


# --- 3. promtool check metrics --------------------------------------------------------------


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")
def test_promtool_check_metrics_accepts_the_exposition(scenario: Scenario) -> None:
    assert "session_logins_total" in scenario.exposition or not scenario.tally.logins
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=scenario.exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""


# --- 4. recording rules and alerts ----------------------------------------------------------


def recorded_names() -> list[str]:
    names = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names += [rule["record"] for rule in group["rules"] if "record" in rule]
    return names


def test_every_recording_rule_produces_data(scenario: Scenario) -> None:
    prometheus, at = scenario.prometheus, scenario.at
    names = recorded_names()
    assert len(names) >= 8
    without = [name for name in names if not finite(prometheus.query(f'{name}{{job="{JOB}"}}', at))]
    assert without == [], f"recorded series without data: {without}"
    # Values the scenario fixes.
    assert prometheus.value(f'job:http_5xx:ratio5m{{job="{JOB}"}}', at) == 0
    rate = prometheus.value(f'job:increments:rate1m{{job="{JOB}"}}', at)
    assert rate is not None
    assert rate > 0
    routes = {
        s["metric"]["route"]
        for s in prometheus.query(f'route:http_requests:rate1m{{job="{JOB}"}}', at)
    }
    assert {"/increment", "unmatched", "/api/health", "/metrics"} <= routes


def test_rules_evaluate_cleanly_and_no_alert_fires(scenario: Scenario) -> None:
    prometheus = scenario.prometheus
    groups = prometheus.api("rules")["groups"]
    loaded = {Path(group["file"]).resolve() for group in groups}
    assert loaded == {path.resolve() for path in rule_files()}
    broken = [
        f"{rule['name']}: {rule.get('lastError')}"
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert broken == []
    # An evaluation after the last scrape of traffic, so the alerts have seen all of it.
    deadline = time.monotonic() + 10
    while min(_evaluated_at(group) for group in groups) <= scenario.at:
        assert time.monotonic() < deadline, "rules not evaluated since the traffic"
        time.sleep(0.2)
        groups = prometheus.api("rules")["groups"]

    alerts = prometheus.api("alerts")["alerts"]
    firing = [alert["labels"] for alert in alerts if alert["state"] == "firing"]
    assert firing == [], "alerts firing in a healthy scenario"
    pending = [
        alert["labels"]
        for alert in alerts
        if alert["state"] == "pending" and alert["labels"]["alertname"] not in MAY_BE_PENDING
    ]
    assert pending == [], "alert conditions true in a healthy scenario"


def _evaluated_at(group: dict[str, Any]) -> float:
    """The Unix time of a rule group's last evaluation (RFC 3339, up to nanoseconds, which
    datetime does not parse: the fraction is added apart)."""
    match = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", group["lastEvaluation"])
    assert match, group["lastEvaluation"]
    whole, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    seconds = datetime.datetime.fromisoformat(whole + zone).timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)
