"""The cost of exactly once: batches, Idempotency-Keys and durable acknowledgements.

    python -m bench.exactly_once              # about 10 minutes, 10M keys recorded first
    python -m bench.exactly_once --quick      # a smoke run: 100k keys, short runs

One service (one worker, the default flush interval) on a database of its own, driven on
loopback; every figure is a ratio to plain ``POST /increment`` measured in the same run,
interleaved (two rounds), because the machine is shared:

* **batch**: ``POST /increments`` with 100 items per request, in increments per second;
* **keyed**: ``POST /increment`` with an ``Idempotency-Key`` of its own on every request,
  with ``--prefill`` keys (10 million) already recorded in ``idempotency_keys``;
* **durable**: ``POST /increment`` with ``Prefer: durable`` (64 connections, as wrk's others);
* **durable, open loop**: ``Prefer: durable`` at a fixed 1,000 increments per second
  (bench/openloop.py: latency from each request's scheduled time), with the commits per
  second and the requests per commit from the service's group-size histogram;
* **durable behind large batches**: the same open loop at 200/s while wrk drives plain
  increments over 100,000 keys: a durable group waits on the row locks of the write-behind's
  batch in flight, and this is how long.

Results: ``<out>/exactly_once.json`` and ``<out>/exactly_once.md``; logs in ``<out>/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from tests.support.net import free_port
from tests.support.postgres import with_database
from tests.support.processes import ServiceProcess, service_env

from bench import openloop
from bench.config import BENCH_DIR, log
from bench.driving import metric_sum
from bench.servers import migrate

LUA = BENCH_DIR / "variants.lua"
SYSTEMS = ("single", "batch", "keyed", "durable")
BATCH = 100
TARGETS = {"batch": 10.0, "keyed": 0.85, "durable": 0.3}

PREFILL_SQL = """
INSERT INTO idempotency_keys (slot, scope, key, bucket, fingerprint, recorded_at)
SELECT (t.b % 4)::smallint, 'open', 'prefill-' || g, t.b, '\\x00'::bytea, now()
FROM generate_series(1, $1) AS g,
     (SELECT floor(extract(epoch FROM now()) / 3600)::bigint AS b) AS t
"""


@dataclasses.dataclass
class WrkRun:
    system: str
    seconds: float
    requests: int
    items: int  # increments acknowledged (202 or 204), batch items counted one by one
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def increments_per_s(self) -> float:
        return self.items / self.seconds


async def wrk(url: str, system: str, seconds: int, keys: int, prefix: str) -> WrkRun:
    options = {
        "single": [],
        "batch": [f"batch={BATCH}"],
        "keyed": ["keyed=1"],
        "durable": ["durable=1"],
        "plain": [],
    }[system]
    command = [
        "wrk", "-t2", "-c64", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA), url,
        "--", f"keys={keys}", f"prefix={prefix}", *options,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{text}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return WrkRun(
        system,
        data["duration_us"] / 1e6,
        data["requests"],
        data["items"],
        data["non_2xx"],
        data["errors"],
        data["latency_us"]["p50"] / 1000,
        data["latency_us"]["p99"] / 1000,
    )


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return await response.text()


async def prepare(admin: str, database: str, prefill: int) -> tuple[str, float]:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    url = with_database(admin, database)
    await asyncio.to_thread(migrate, url)
    started = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(PREFILL_SQL, prefill, timeout=3600)
        await conn.execute("VACUUM ANALYZE idempotency_keys")
    finally:
        await conn.close()
    return url, time.monotonic() - started


async def durable_open_loop(url: str, rate: float, seconds: float, keys: int) -> dict[str, Any]:
    """Durable requests at a fixed rate; latency, and the commits they took."""
    before = await scrape(url)
    plan = openloop.Plan(
        url,
        "/increment",
        rate=rate,
        duration=seconds,
        headers={"Content-Type": "application/json", "Prefer": "durable"},
        body=functools.partial(openloop.increment_body, prefix=f"durable-{rate:g}", keys=keys),
        connections=64,
    )
    result = await openloop.run(plan)
    after = await scrape(url)

    def delta(name: str) -> float:
        return (metric_sum(after, name) or 0.0) - (metric_sum(before, name) or 0.0)

    commits = delta("increment_durable_group_size_count")
    committed = delta("increment_durable_group_size_sum")
    return {
        "offered_per_s": rate,
        "answered_per_s": round(result.achieved_rate, 1),
        "statuses": result.statuses,
        "lost": result.lost,
        "latency_ms": dataclasses.asdict(result.latency),
        "generator_lag_p99_ms": result.generator_lag.p99_ms,
        "commits_per_s": round(commits / seconds, 1),
        "requests_per_commit": round(committed / commits, 2) if commits else None,
    }


def flush_durations(log_text: str, since: float) -> list[float]:
    """The durations of the batches the service applied from ``since`` (Unix time) on."""
    durations = []
    for line in log_text.splitlines():
        if line.startswith("{") and '"flush applied"' in line:
            entry = json.loads(line)
            if dt.datetime.fromisoformat(entry["ts"]).timestamp() >= since:
                durations.append(float(entry["duration"]))
    return durations


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    prefill = 100_000 if args.quick else args.prefill
    seconds = 5 if args.quick else args.seconds
    log(f"database {args.database}: migrating, then recording {prefill:,} idempotency keys")
    database_url, prefill_s = await prepare(args.postgres, args.database, prefill)
    log(f"{prefill:,} keys recorded in {prefill_s:.0f} s")
    env = service_env(database_url, args.redis, out / "logs", LOG_FORMAT="json")
    service = ServiceProcess(env, out / "logs" / "exactly-once-service.log", port=free_port())
    service.start()
    results: dict[str, Any] = {"prefill": prefill, "prefill_seconds": round(prefill_s, 1)}
    try:
        runs: dict[str, list[WrkRun]] = {system: [] for system in SYSTEMS}
        for round_ in range(2):
            order = SYSTEMS if round_ == 0 else tuple(reversed(SYSTEMS))
            for system in order:
                run_ = await wrk(service.url, system, seconds, 1000, f"{system}{round_}")
                runs[system].append(run_)
                log(
                    f"{system:8} {run_.increments_per_s:>10,.0f} increments/s"
                    f" ({run_.requests / run_.seconds:,.0f} req/s) p99 {run_.p99_ms:.1f} ms"
                    f" non-2xx {run_.non_2xx} errors {run_.errors}"
                )
        rate = {s: statistics.mean(r.increments_per_s for r in runs[s]) for s in SYSTEMS}
        results["wrk"] = {s: [dataclasses.asdict(r) for r in runs[s]] for s in SYSTEMS}
        results["increments_per_s"] = {s: round(v, 1) for s, v in rate.items()}
        results["ratios"] = {s: round(rate[s] / rate["single"], 3) for s in SYSTEMS}

        open_seconds = 8 if args.quick else 30
        log("durable at a fixed 1,000/s")
        results["durable_1000"] = await durable_open_loop(service.url, 1000, open_seconds, 1000)
        log(f"  {results['durable_1000']}")

        log("durable at 200/s while wrk drives plain increments over 100,000 keys")
        alone = await durable_open_loop(service.url, 200, open_seconds, 100_000)
        started = time.time()
        load = asyncio.ensure_future(wrk(service.url, "plain", open_seconds + 4, 100_000, "big"))
        await asyncio.sleep(2)
        behind = await durable_open_loop(service.url, 200, open_seconds, 100_000)
        plain = await load
        flushes = flush_durations(service.log(), started)
        results["durable_behind_batches"] = {
            "alone": alone,
            "behind": behind,
            "plain_per_s": round(plain.increments_per_s),
            "flush_seconds": {
                "count": len(flushes),
                "median": round(statistics.median(flushes), 3) if flushes else None,
                "max": round(max(flushes), 3) if flushes else None,
            },
        }
        log(f"  alone {alone['latency_ms']}; behind {behind['latency_ms']}")
    finally:
        service.stop()
    return results


def markdown(results: dict[str, Any]) -> str:
    rate, ratios = results["increments_per_s"], results["ratios"]
    d1000 = results["durable_1000"]
    behind = results["durable_behind_batches"]
    lines = [
        "# The cost of exactly once",
        "",
        f"One worker; {results['prefill']:,} idempotency keys recorded before the runs; wrk"
        " -t2 -c64, two interleaved rounds. Ratios are to plain `POST /increment` in the same"
        " run.",
        "",
        "| system | increments/s | ratio to plain | target | met |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for system in SYSTEMS:
        target = TARGETS.get(system)
        if system == "keyed":
            goal, met = ">= 0.85 (cost <= 15 %)", ratios[system] >= 0.85
        elif target is not None:
            goal, met = f">= {target:g}", ratios[system] >= target
        else:
            goal, met = "-", None
        shown = "-" if met is None else ("yes" if met else "**no**")
        lines.append(
            f"| {system} | {rate[system]:,.0f} | {ratios[system]:.2f} | {goal} | {shown} |"
        )
    p99 = d1000["latency_ms"]["p99_ms"]
    lines += [
        "",
        "Durable at a fixed 1,000 increments/s (open loop, latency from the scheduled time):"
        f" p50 {d1000['latency_ms']['p50_ms']} ms, p99 {p99} ms (target < 50 ms:"
        f" {'yes' if p99 is not None and p99 < 50 else '**no**'}), max"
        f" {d1000['latency_ms']['max_ms']} ms; {d1000['commits_per_s']} commits/s, "
        f"{d1000['requests_per_commit']} requests per commit; statuses {d1000['statuses']}.",
        "",
        "Durable at 200/s over 100,000 keys, alone: p50"
        f" {behind['alone']['latency_ms']['p50_ms']} ms, p99"
        f" {behind['alone']['latency_ms']['p99_ms']} ms; behind the write-behind's batches"
        f" (wrk plain at {behind['plain_per_s']:,}/s over the same keys, flushes median"
        f" {behind['flush_seconds']['median']} s, max {behind['flush_seconds']['max']} s): p50"
        f" {behind['behind']['latency_ms']['p50_ms']} ms, p99"
        f" {behind['behind']['latency_ms']['p99_ms']} ms, max"
        f" {behind['behind']['latency_ms']['max_ms']} ms; statuses"
        f" {behind['behind']['statuses']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", default="bench_exactly_once")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seconds", type=int, default=20, help="wrk seconds per run")
    parser.add_argument("--prefill", type=int, default=10_000_000)
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    out = Path(args.out)
    (out / "exactly_once.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "exactly_once.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
