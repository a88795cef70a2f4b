"""A paired A/B of two builds of increment-service: both run side by side and every round loads
both *at the same time*, so they share the machine's noise.

    python -m bench.paired --before /tmp/venv-before --after /tmp/venv-after \\
        --scenario default,keyed,durable,durable_keyed --rounds 7 --seconds 10 -c 32

``--before`` and ``--after`` are each a virtualenv with the service installed (its
``bin/python`` runs it, and migrates its database with its own schema), or a source tree, run
as ``PYTHONPATH=TREE/src`` with this interpreter (its schema is then migrated by the installed
package, as ``bench.run --service-pythonpath`` does).

Each side gets a database of its own (``<database>_before``, ``<database>_after``, dropped,
recreated and migrated) and one service with ``WORKERS=1 ACCESS_LOG=false
FLUSH_INTERVAL_SECONDS=2`` on a free loopback port; both share one Redis database. Per
scenario a warm-up round (discarded), then ``--rounds`` rounds: one ``wrk -t1 -c C`` with
bench/paired.lua against each service, started together, in alternating order. Scenarios:

* ``default``: plain ``POST /increment``;
* ``keyed``: a fresh ``Idempotency-Key`` on every request;
* ``durable``: ``Prefer: durable``;
* ``durable_keyed``: both.

Per round and side: requests/s, p50 and p99 from wrk, the service's CPU time per request
(from /proc), and the exactness check: the sum of the counters of the round's main phase
equals wrk's main-phase acknowledgements (202 or 204), and for keyed scenarios the round's
rows in ``idempotency_keys`` equal the sum over all its counters (drain included). Then
AFTER/BEFORE per round, summarised as median (min-max). At the end each service's log is read
for warnings and errors (``flush failed``, ``out of shared memory``...).

Results: ``<out>/paired-<scenario>-c<C>.json`` and ``<out>/paired.md``; service logs and wrk's
output in ``<out>/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from tests.support.net import free_port
from tests.support.postgres import with_database
from tests.support.processes import service_env

from bench.config import BENCH_DIR, DEFAULT_FLUSH_INTERVAL, Config, log
from bench.driving import SUMS_SQL, Pool, client_session
from bench.servers import Server, wait_ready

LUA = BENCH_DIR / "paired.lua"
SIDES = ("before", "after")
SCENARIOS = {
    "default": [],
    "keyed": ["keyed=1"],
    "durable": ["durable=1"],
    "durable_keyed": ["durable=1", "keyed=1"],
}
RATIOS = ("rps", "p50", "p99", "cpu")
KEYS_SQL = "SELECT count(*) FROM idempotency_keys WHERE starts_with(key, $1)"


@dataclasses.dataclass(frozen=True)
class Side:
    """One build: how to run its service (an interpreter, maybe a PYTHONPATH) and its database."""

    name: str
    given: str
    python: str
    pythonpath: str | None
    database_url: str
    source: str  # where increment_service is imported from
    commit: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env | extra

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "increment_service", *args]


def resolve(name: str, given: str, database_url: str) -> Side:
    path = Path(given).resolve()
    if (path / "bin" / "python").exists():
        python, pythonpath = str(path / "bin" / "python"), None
    elif (path / "src" / "increment_service").is_dir():
        python, pythonpath = sys.executable, str(path / "src")
    else:
        raise SystemExit(f"--{name} {given}: neither a virtualenv nor a source tree")
    side = Side(name, given, python, pythonpath, database_url, "", "")
    found = subprocess.run(
        [python, "-c", "import increment_service; print(increment_service.__file__)"],
        env=side.env(),
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),  # not this tree's src/ by accident
    ).stdout.strip()
    source = str(Path(found).parent)
    commit = subprocess.run(
        ["git", "-C", source, "log", "-1", "--format=%h"], capture_output=True, text=True
    ).stdout.strip()
    return dataclasses.replace(side, source=source, commit=commit or "?")


async def prepare(admin: str, sides: Sequence[Side]) -> None:
    """Drop, recreate and migrate each side's database, with its own schema where it can."""
    conn = await asyncpg.connect(admin)
    try:
        for side in sides:
            name = side.database_url.rsplit("/", 1)[1]
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    for side in sides:
        # A source tree's PYTHONPATH has no increment_service.schema: the installed one migrates.
        command = side.cli("migrate") if side.pythonpath is None else [
            sys.executable, "-m", "increment_service", "migrate"
        ]  # fmt: skip
        env = {**os.environ, "DATABASE_URL": side.database_url, "LOG_LEVEL": "WARNING"}
        await asyncio.to_thread(
            subprocess.run, command, env=env, check=True, stdout=subprocess.DEVNULL
        )


def start(side: Side, redis: str, logs: Path) -> Server:
    port = free_port()
    data = logs / f"data-{side.name}"
    data.mkdir(parents=True, exist_ok=True)
    env = side.env(
        **service_env(side.database_url, redis, data),
        HOST="127.0.0.1",
        PORT=str(port),
        WORKERS="1",
        ACCESS_LOG="false",
        LOG_FORMAT="json",
        FLUSH_INTERVAL_SECONDS=str(DEFAULT_FLUSH_INTERVAL),
        REPLICA_ID=f"paired-{side.name}",
    )
    log_path = logs / f"service-{side.name}.log"
    with log_path.open("wb") as out:  # this run's alone: its warnings are counted at the end
        process = subprocess.Popen(
            side.cli("serve"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tempfile.gettempdir(),
        )
    return Server(side.name, 1, port, process, log_path, "/health")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A run's two services, a pool on each one's database, the options and where logs go."""

    servers: dict[str, Server]
    pools: dict[str, Pool]
    args: argparse.Namespace
    logs: Path


@contextlib.contextmanager
def services(sides: Sequence[Side], redis: str, logs: Path) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        for side in sides:
            servers[side.name] = start(side, redis, logs)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


async def wrk(
    pair: Pair, name: str, options: Sequence[str], prefix: str, seconds: int
) -> dict[str, Any]:
    args = pair.args
    command = [
        "wrk", f"-t{args.threads}", f"-c{args.c}", f"-d{seconds}s", "--timeout", "10s",
        "--latency", "-s", str(LUA), pair.servers[name].url + "/increment", "--",
        f"keys={args.keys}", f"prefix={prefix}", f"main_seconds={seconds - Config.drain(seconds)}",
        *options,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    (pair.logs / f"wrk-{prefix}.txt").write_text(text)
    stats: dict[str, Any] = {}
    for tag in ("BENCH_JSON ", "PAIRED_JSON "):
        line = next((x for x in text.splitlines() if x.startswith(tag)), None)
        if line is None:
            raise RuntimeError(f"wrk printed no {tag.strip()} line:\n{text}")
        stats |= json.loads(line.removeprefix(tag))
    return stats


async def persisted(pool: Pool, prefix: str, acked_main: int, keyed: bool) -> dict[str, Any]:
    """Once Postgres holds the round's main phase (or 3 flush intervals + 10 s have passed),
    and one flush interval more for the drain phase's last requests: the round's sums."""
    started = time.monotonic()
    while True:
        row = await pool.fetchrow(SUMS_SQL, prefix, prefix + ":")
        assert row is not None
        waited = time.monotonic() - started
        if int(row["main"]) >= acked_main or waited > 3 * DEFAULT_FLUSH_INTERVAL + 10:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(DEFAULT_FLUSH_INTERVAL + 0.5)
    row = await pool.fetchrow(SUMS_SQL, prefix, prefix + ":")
    assert row is not None
    main, everything = int(row["main"]), int(row["everything"])
    result: dict[str, Any] = {"persisted_main": main, "persisted_all": everything}
    result["exact"] = main == acked_main
    if keyed:
        keys = int(await pool.fetchval(KEYS_SQL, prefix + "-"))
        result["idempotency_keys"] = keys
        result["exact"] = result["exact"] and keys == everything
    result["waited_s"] = round(time.monotonic() - started, 2)
    return result


async def one_round(
    pair: Pair, scenario: str, tag: str, order: Sequence[str]
) -> dict[str, dict[str, Any]]:
    servers, seconds = pair.servers, pair.args.seconds
    prefix = {name: f"{tag}-{name}" for name in SIDES}
    cpu = {name: servers[name].cpu_seconds() for name in SIDES}
    runs = await asyncio.gather(
        *(wrk(pair, n, SCENARIOS[scenario], prefix[n], seconds) for n in order)
    )
    got = dict(zip(order, runs, strict=True))
    for name in SIDES:
        stats = got[name]
        stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
        stats["p50"] = stats["latency_us"]["p50"] / 1000
        stats["p99"] = stats["latency_us"]["p99"] / 1000
        used = servers[name].cpu_seconds() - cpu[name]
        stats["cpu"] = used / stats["requests"] * 1e6 if stats["requests"] else float("nan")
    checks = await asyncio.gather(
        *(
            persisted(pair.pools[n], prefix[n], int(got[n]["acked_main"]), "keyed" in scenario)
            for n in SIDES
        )
    )
    for name, check in zip(SIDES, checks, strict=True):
        got[name] |= check
    return got


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def log_findings(path: Path) -> dict[str, int]:
    """Warnings and errors in a service's JSON log, by message (and any line that mentions
    Postgres's ``out of shared memory``)."""
    found: Counter[str] = Counter()
    if not path.exists():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        if "out of shared memory" in line:
            found["out of shared memory"] += 1
        try:
            record = json.loads(line)
        except ValueError:
            if line.startswith("Traceback"):
                found["Traceback"] += 1
            continue
        if isinstance(record, dict) and str(record.get("level", "")).lower() in (
            "warning",
            "error",
            "critical",
        ):
            found[f"{record['level'].lower()}: {record.get('msg') or record.get('message')}"] += 1
    return dict(found)


def round_line(number: int, got: dict[str, dict[str, Any]]) -> str:
    b, a = got["before"], got["after"]
    return (
        f"r{number} req/s {b['rps']:,.0f} / {a['rps']:,.0f} ({a['rps'] / b['rps']:.3f})"
        f" p50 {b['p50']:.2f} / {a['p50']:.2f} ms p99 {b['p99']:.2f} / {a['p99']:.2f} ms"
        f" CPU/req {b['cpu']:.0f} / {a['cpu']:.0f} us"
        f" | acked main/persisted {b['acked_main']}/{b['persisted_main']}"
        f" {a['acked_main']}/{a['persisted_main']}"
        + (
            f" keys {b['idempotency_keys']}/{b['persisted_all']}"
            f" {a['idempotency_keys']}/{a['persisted_all']}"
            if "idempotency_keys" in b
            else ""
        )
        + f" 204s {b['s204']}/{a['s204']} non-2xx {b['non_202']}/{a['non_202']}"
    )


async def run_scenario(pair: Pair, scenario: str) -> dict[str, Any]:
    args = pair.args
    tag = f"{scenario}-{int(time.time())}"
    log(f"{scenario}: warm-up ({args.warmup} s, discarded)")
    options = SCENARIOS[scenario]
    await asyncio.gather(*(wrk(pair, n, options, f"{tag}-w-{n}", args.warmup) for n in SIDES))
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        order = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
        got = await one_round(pair, scenario, f"{tag}-r{number}", order)
        ratios = {k: got["after"][k] / got["before"][k] for k in RATIOS}
        rounds.append({"round": number, "order": list(order), **got, "ratios": ratios})
        log(f"{scenario} {round_line(number, got)}")
    return {
        "scenario": scenario,
        "connections": args.c,
        "seconds": args.seconds,
        "rounds": rounds,
        "ratios": {k: summary([r["ratios"][k] for r in rounds]) for k in RATIOS},
        "exact": {n: sum(bool(r[n]["exact"]) for r in rounds) for n in SIDES},
    }


def markdown(sides: Sequence[Side], results: list[dict[str, Any]], logs: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    lines = [f"- {s.name.upper()}: `{s.given}` ({s.source}, {s.commit})" for s in sides]
    lines += [
        "",
        "AFTER/BEFORE per round: median (min-max); exact: rounds whose persisted sums equal "
        "what was acknowledged, BEFORE / AFTER.",
        "",
        "| scenario | c | rounds | req/s | p50 | p99 | CPU per request | exact |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        n, x = len(r["rounds"]), r["exact"]
        ratios = " | ".join(cell(r["ratios"][k]) for k in RATIOS)
        lines.append(
            f"| {r['scenario']} | {r['connections']} | {n} | {ratios} | "
            f"{x['before']}/{n}, {x['after']}/{n} |"
        )
    lines.append("")
    for name, found in logs.items():
        text = ", ".join(f"{k} x{v}" for k, v in found.items()) or "no warnings or errors"
        lines.append(f"- {name.upper()}'s service log: {text}")
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    given = {"before": args.before, "after": args.after}
    sides = [
        resolve(n, given[n], with_database(args.postgres, f"{args.database}_{n}")) for n in SIDES
    ]
    for side in sides:
        log(f"{side.name}: {side.python} ({side.source} at {side.commit})")
    await prepare(args.postgres, sides)
    results = []
    with services(sides, args.redis, logs) as servers:
        async with client_session() as session:
            await asyncio.gather(*(wait_ready(s, session) for s in servers.values()))
        pools: dict[str, Pool] = {}
        for side in sides:
            pools[side.name] = await asyncpg.create_pool(side.database_url, min_size=1, max_size=2)
        try:
            for scenario in args.scenario:
                result = await run_scenario(Pair(servers, pools, args, logs), scenario)
                results.append(result)
                path = out / f"paired-{scenario}-c{args.c}.json"
                path.write_text(json.dumps(result, indent=1) + "\n")
        finally:
            for pool in pools.values():
                await pool.close()
    findings = {s.name: log_findings(servers[s.name].log_path) for s in sides}
    text = markdown(sides, results, findings)
    (out / "paired.md").write_text(text)
    print(text)
    exact = all(r["exact"][n] == len(r["rounds"]) for r in results for n in SIDES)
    return 0 if exact else 1


def scenarios(value: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--before", required=True, help="a virtualenv or a source tree")
    parser.add_argument("--after", required=True, help="a virtualenv or a source tree")
    parser.add_argument(
        "--scenario", type=scenarios, default=["default"], help=", ".join(SCENARIOS)
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=10, help="wrk seconds per round")
    parser.add_argument("--warmup", type=int, default=3, help="wrk seconds, discarded")
    parser.add_argument("-c", type=int, default=32, help="wrk connections per service")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads per service")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--database", default="bench_paired", help="prefix: <prefix>_before, <prefix>_after"
    )
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-paired")
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
