"""The benchmark of increment-service: one command, everything on loopback.

From the repository's root (``bench`` is a package there, beside ``tests``, whose loopback
helpers it shares)::

    python -m bench.run                 # the full run, 5 s per scenario (~4 minutes)
    python -m bench.run --quick         # a smoke run (~1 minute)
    python -m bench.run --duration 10 --out /tmp/bench

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

import asyncpg

from bench.config import BENCH_DIR, CEILING, NAIVE, SERVICE, SERVICE_LOG, SESSION, Config, log
from bench.driving import ScenarioResult, client_session, run_scenario, session_cookie
from bench.flush import FlushResult, run_flush_bench
from bench.reporting import (
    add_ratios,
    evaluate_targets,
    machine_info,
    markdown,
    plot,
    progress_line,
)
from bench.servers import prepare_databases, servers_for, wait_ready


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


async def run_all(config: Config) -> dict[str, Any]:
    """Every scenario of every worker count, then the flush cost: results.json's content."""
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
    met = [t["met"] for t in data["targets"]]
    log(
        f"targets met: {met.count(True)}, missed: {met.count(False)}, "
        f"not measured: {met.count(None)}; results in {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
