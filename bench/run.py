"""The benchmark of increment-service: one command, everything on loopback.

From the repository's root (``bench`` is a package there, beside ``tests``, whose loopback
helpers it shares)::

    python -m bench.run                        # the full run (~24 minutes on 2 cores)
    python -m bench.run --quick                # a smoke run (~2 minutes)
    python -m bench.run --only openloop,flush  # parts of it: load, openloop, flush

For each worker count (1 and 2) it starts, side by side on free loopback ports:

* ``bare``: bench/bare.py, aiohttp + uvloop, orjson and two type checks (issue 12's ceiling);
* ``strict``: bench/ceiling.py, the same with the contract's strict parsing and validation;
* ``service``: ``increment-service`` with ACCESS_LOG=false;
* ``service+log``: ``increment-service`` with ACCESS_LOG=true (stdout to a log file);
* ``naive``: bench/naive.py, one UPSERT per request through an asyncpg pool;

then, for each key range (1, 1000, 100000 distinct keys), drives each of them in turn with wrk
and bench/increment.lua (interleaved, so a noisy neighbour hurts all of them alike), plus
``service+session`` (POST /api/increment with a session cookie), and the bare ceiling once
more at the end of the group. The ceilings and the naive design run ``--duration`` seconds,
the service scenarios ``--steady`` seconds: for those it samples /metrics every 100 ms
(increment_persist_lag_seconds), sends a probe increment every 100 ms and watches Postgres for
it (the measured age of the oldest unpersisted increment), and after the run checks that
Postgres holds exactly what was acknowledged.

Then, at one worker, the open loop (bench/openloop.py): /increment and /api/increment at the
same fixed rates, latency from each request's scheduled time. Last, alone, the cost of
``writebehind.apply_batch`` on 1k/10k/100k keys (bench/flush.py).

Results: <out>/results.json, <out>/results.md, <out>/throughput_p99.png; logs in <out>/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.config import (
    BARE,
    BARE_AGAIN,
    BENCH_DIR,
    NAIVE,
    ORDER,
    PARTS,
    SERVICE,
    SERVICE_LOG,
    SESSION,
    STRICT,
    Config,
    log,
)
from bench.driving import (
    Pool,
    ScenarioResult,
    client_session,
    run_open_loop,
    run_scenario,
    session_cookie,
    wrk_throughput,
)
from bench.flush import FlushResult, run_flush_process
from bench.reporting import (
    add_ratios,
    evaluate_targets,
    machine_info,
    markdown,
    open_loop_line,
    plot,
    progress_line,
)
from bench.servers import Server, prepare_databases, servers_for, wait_ready


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark increment-service against two ceilings and a naive design.",
    )
    parser.add_argument(
        "--duration", type=float, default=8, help="wrk seconds per ceiling and naive scenario"
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=60,
        help="wrk seconds per service scenario: the window of steady load freshness is "
        "measured over (600 samples at 60 s)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (~2 minutes)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"parts to run, comma separated, of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(ORDER),
        help=f"systems the load part drives, of {', '.join(ORDER)} (default: all; ratios "
        "need the ceilings)",
    )
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
        "--open-fractions",
        default="0.3,0.5,0.7",
        help="open-loop rates as fractions of the service's wrk throughput (POST /increment, "
        "1,000 keys) at --open-workers, measured in the same run",
    )
    parser.add_argument(
        "--open-rates", default="", help="open-loop rates in requests/s instead of fractions"
    )
    parser.add_argument("--open-duration", type=float, default=15, help="seconds per open-loop run")
    parser.add_argument(
        "--open-connections", type=int, default=64, help="open-loop connections (bounded)"
    )
    parser.add_argument("--open-workers", type=int, default=1, help="service WORKERS there")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of the Python servers (slows them: figures are not "
        "comparable with an unprofiled run)",
    )
    parser.add_argument(
        "--service-pythonpath",
        help="PYTHONPATH for the service processes and the flush cost (e.g. a scratch copy's "
        "or an older commit's src/); the installed increment_service otherwise",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    systems = tuple(s for s in args.systems.split(",") if s)
    if set(systems) - set(ORDER):
        parser.error(f"--systems: unknown system(s) {', '.join(sorted(set(systems) - set(ORDER)))}")

    def whole_seconds(value: float, default: float, in_quick: float) -> int:
        chosen = in_quick if quick and value == default else value
        return max(2, math.ceil(chosen))  # wrk takes whole seconds

    default_keys = "1000" if quick else "1,1000,100000"
    open_duration = args.open_duration
    if quick and open_duration == 15:
        open_duration = 5
    return Config(
        duration=whole_seconds(args.duration, 8, 2),
        steady=whole_seconds(args.steady, 60, 4),
        quick=quick,
        parts=parts,
        systems=systems,
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
        open_fractions=tuple(float(f) for f in args.open_fractions.split(",") if f),
        open_rates=tuple(float(r) for r in args.open_rates.split(",") if r),
        open_duration=open_duration,
        open_connections=args.open_connections,
        open_workers=args.open_workers,
    )


async def run_group(
    config: Config,
    run_id: str,
    servers: dict[str, Server],
    keys: int,
    cookie: str | None,
    session_note: str,
    pool: Pool,
    session: aiohttp.ClientSession,
) -> list[ScenarioResult]:
    """One worker count and key range: every system in ORDER, then the bare ceiling again."""
    results = []
    workers = servers[SERVICE].workers
    for system in (*ORDER, BARE_AGAIN):
        if (BARE if system == BARE_AGAIN else system) not in config.systems:
            continue
        server = servers.get(BARE if system == BARE_AGAIN else system, servers[SERVICE])
        if system == SESSION and cookie is None:
            skipped = ScenarioResult(system, workers, keys, "/api/increment", "skipped")
            skipped.note = session_note
            results.append(skipped)
            continue
        try:
            result = await run_scenario(config, run_id, server, system, keys, pool, session, cookie)
        except Exception as exc:  # noqa: BLE001 -- report it, run the rest
            result = ScenarioResult(system, workers, keys, "", "failed")
            result.note = f"failed: {type(exc).__name__}: {exc}"[:500]
            log(f"{result.label}: {result.note}")
        else:
            log(progress_line(result))
        results.append(result)
    return results


async def run_open_loops(
    config: Config,
    run_id: str,
    service: Server,
    cookie: str | None,
    session_note: str,
    scenarios: list[ScenarioResult],
) -> tuple[list[dict[str, Any]], str]:
    """/increment and /api/increment at the same fixed rates, alternating which goes first
    (ABBA), so a trend in the machine's load does not favour one. The rates: --open-rates, or
    fractions of the service's wrk throughput at this worker count and 1,000 keys (this run's,
    else a wrk run of --duration seconds now). Returns the runs and how the rates were chosen."""
    workers = service.workers
    rates: list[tuple[float, float | None]]  # (requests/s, fraction of the wrk throughput)
    if config.open_rates:
        rates = [(rate, None) for rate in config.open_rates]
        basis = "rates given (--open-rates)"
    else:
        measured = [
            r.rps
            for r in scenarios
            if r.system == SERVICE and r.workers == workers and r.keys == 1000 and r.rps
        ]
        if measured:
            base = measured[0]
            basis = f"the service's wrk throughput at {workers} worker(s), 1,000 keys: {base:,.0f}"
        else:
            base = await wrk_throughput(config, service, 1000, f"{run_id}.calibrate")
            basis = (
                f"a wrk calibration run of the service at {workers} worker(s), 1,000 keys: "
                f"{base:,.0f} req/s"
            )
        rates = [(round(base * f), f) for f in config.open_fractions]
    runs: list[dict[str, Any]] = []
    for i, (rate, fraction) in enumerate(rates):
        systems = [SERVICE, SESSION] if i % 2 == 0 else [SESSION, SERVICE]
        for system in systems:
            if system == SESSION and cookie is None:
                runs.append({"system": SESSION, "rate": rate, "skipped": session_note})
                continue
            slug = system.replace("+", "-")
            prefix = f"{run_id}.open.{slug}.w{workers}.r{rate:.0f}"
            run = await run_open_loop(config, service, system, rate, prefix, cookie)
            run["fraction"] = fraction
            runs.append(run)
            log(open_loop_line(run))
    return runs, basis


async def run_all(config: Config) -> dict[str, Any]:
    """Every part asked for: results.json's content."""
    run_id = "r" + dt.datetime.now(dt.UTC).strftime("%H%M%S") + uuid.uuid4().hex[:4]
    started = dt.datetime.now(dt.UTC)
    log(f"preparing databases {config.database} and {config.database}_flush")
    await prepare_databases(config)
    results: list[ScenarioResult] = []
    open_runs: list[dict[str, Any]] = []
    open_basis = ""
    load, open_loop = "load" in config.parts, "openloop" in config.parts
    worker_counts = sorted({*config.workers, config.open_workers})
    async with (
        client_session() as session,
        asyncpg.create_pool(config.database_url, min_size=1, max_size=2) as pool,
    ):
        for workers in worker_counts:
            open_here = open_loop and workers == config.open_workers
            load_here = load and workers in config.workers
            if not (load_here or open_here):
                continue
            systems = [SERVICE]  # the open loop's, the session's, and a wait_ready's
            if load_here:
                wanted = {SERVICE if s == SESSION else s for s in config.systems}
                systems = [s for s in (BARE, STRICT, SERVICE, SERVICE_LOG, NAIVE) if s in wanted]
                systems += [] if SERVICE in systems else [SERVICE]
            with servers_for(config, workers, systems) as servers:
                log(f"starting {', '.join(servers)} with {workers} worker(s)")
                await asyncio.gather(*(wait_ready(s, session) for s in servers.values()))
                service = servers[SERVICE]
                cookie, session_note = await session_cookie(
                    session, service.url, f"{run_id}.session-check:{workers}"
                )
                log(f"session: {session_note}")
                if load_here:
                    for keys in config.keys:
                        results += await run_group(
                            config, run_id, servers, keys, cookie, session_note, pool, session
                        )
                if open_here:
                    open_runs, open_basis = await run_open_loops(
                        config, run_id, service, cookie, session_note, results
                    )
    flush: list[FlushResult] = []
    flush_error = None
    if "flush" in config.parts:
        log(f"flush cost: apply_batch with {', '.join(map(str, config.flush_sizes))} keys")
        try:
            flush = await run_flush_process(
                config.flush_database_url,
                list(config.flush_sizes),
                config.flush_repeats,
                config.service_pythonpath,
            )
        except Exception as exc:  # noqa: BLE001 -- the load figures are still worth writing
            flush_error = f"{type(exc).__name__}: {exc}"[:500]
            log(f"flush cost failed: {flush_error}")
    add_ratios(results)
    return {
        "meta": machine_info(config, run_id, started),
        "scenarios": [dataclasses.asdict(r) for r in results],
        "openloop": {"basis": open_basis, "runs": open_runs},
        "flush": [f.as_dict() for f in flush],
        "flush_error": flush_error,
        "targets": evaluate_targets(results, open_runs, flush),
    }


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
    data = asyncio.run(run_all(config))
    (config.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    report = markdown(data)
    (config.out / "results.md").write_text(report)
    plot(data, config.out / "throughput_p99.png")
    print(report)
    met = [t["met"] for t in data["targets"] if not t["informative"]]
    log(
        f"targets met: {met.count(True)}, missed: {met.count(False)}, "
        f"not measured: {met.count(None)}; results in {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
