"""API tokens against sessions, paired: what a bearer token costs on the hot path, and what a
flood of well-formed bad tokens costs Postgres.

    python -m bench.tokens --service /tmp/venv-tokens --rounds 7 --seconds 10 -c 32

``--service`` is a virtualenv with the service installed, or a source tree (as in
bench.paired). Two services of that one build run side by side (``WORKERS=1``, a database of
each's own, one Redis database): the *cookie* side, loaded with ``POST /api/increment`` and a
session cookie, and the *token* side, loaded with the same route and ``Authorization: Bearer``.
Per round both are loaded at the same time by ``wrk -t1 -c C`` (bench/paired.lua; alternating
start order), so they share the machine's noise; token/cookie ratios per round, summarised as
the median (min-max); each round's persisted sums are checked against its acknowledgements.

Then the flood: ``--flood-seconds`` of ``wrk -c --flood-c`` sending each request with another
distinct well-formed but unknown token (bench/flood.lua; ``--flood-tokens`` of them, made with
the service's own checksum), while the good token keeps loading the same service as above. The
token side's ``increment_token_lookups_total`` before and after gives Postgres lookup
statements per second (and tokens looked up per second); the good token's throughput and p99
are compared with its own round before the flood.

Results: ``<out>/tokens.md`` and ``<out>/tokens.json``; logs in ``<out>/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from tests.support.metrics import metric_value
from tests.support.postgres import with_database

from bench.config import BENCH_DIR, Config, log
from bench.driving import Pool, client_session
from bench.paired import log_findings, persisted, prepare, resolve, services, summary
from bench.servers import wait_ready

LUA, FLOOD_LUA = BENCH_DIR / "paired.lua", BENCH_DIR / "flood.lua"
SIDES = ("cookie", "token")
RATIOS = ("rps", "p50", "p99", "cpu")
PASSWORD = "bench password 1"  # noqa: S105 -- a throwaway account on a bench database


async def credentials(base: str) -> tuple[str, str]:
    """A new user of the service at ``base``: its session's Cookie header and an API token."""
    account = {"email": f"bench-{secrets.token_hex(6)}@example.com", "password": PASSWORD}
    async with aiohttp.ClientSession(base_url=base, cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.post("/api/users", json=account) as response:
            assert response.status == 201, await response.text()
        async with s.post("/api/sessions", json=account) as response:
            assert response.status == 201, await response.text()
            morsel = response.cookies["INCREMENT_SESSION"]
            cookie = f"INCREMENT_SESSION={morsel.value}"
        body = {"name": "bench", "scopes": ["increment"]}
        async with s.post("/api/tokens", json=body, headers={"Cookie": cookie}) as response:
            assert response.status == 201, await response.text()
            token = str((await response.json())["token"])
    return cookie, token


async def wrk(
    url: str, script: Path, options: Sequence[str], seconds: int, c: int, out: Path
) -> dict[str, Any]:
    command = [
        "wrk", "-t1", f"-c{c}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s",
        str(script), url, "--", *options,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    text = (await process.communicate())[0].decode(errors="replace")
    await asyncio.to_thread(out.write_text, text)
    stats: dict[str, Any] = {}
    for line in text.splitlines():
        for tag in ("BENCH_JSON ", "PAIRED_JSON ", "FLOOD_JSON "):
            if line.startswith(tag):
                stats |= json.loads(line.removeprefix(tag))
    if not stats:
        raise RuntimeError(f"wrk printed no summary:\n{text}")
    return stats


def measured(stats: dict[str, Any], cpu: float) -> dict[str, Any]:
    stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["p50"] = stats["latency_us"]["p50"] / 1000
    stats["p99"] = stats["latency_us"]["p99"] / 1000
    stats["cpu"] = cpu / stats["requests"] * 1e6 if stats["requests"] else float("nan")
    return stats


class Bench:
    def __init__(
        self, args: argparse.Namespace, servers: Any, pools: dict[str, Pool], auth: dict[str, str]
    ) -> None:
        self.args, self.servers, self.pools, self.auth = args, servers, pools, auth
        self.logs = args.out / "logs"

    def load(self, side: str, prefix: str, seconds: int) -> Any:
        a = self.args
        options = [
            f"keys={a.keys}", f"prefix={prefix}", "path=/api/increment",
            f"main_seconds={seconds - Config.drain(seconds)}", self.auth[side],
        ]  # fmt: skip
        out = self.logs / f"wrk-{prefix}.txt"
        return wrk(self.servers[side].url, LUA, options, seconds, a.c, out)

    async def round(self, tag: str, order: Sequence[str]) -> dict[str, dict[str, Any]]:
        seconds = self.args.seconds
        cpu = {n: self.servers[n].cpu_seconds() for n in SIDES}
        runs = await asyncio.gather(*(self.load(n, f"{tag}-{n}", seconds) for n in order))
        got = {
            n: measured(s, self.servers[n].cpu_seconds() - cpu[n])
            for n, s in zip(order, runs, strict=True)
        }
        checks = await asyncio.gather(
            *(
                persisted(self.pools[n], f"{tag}-{n}", int(got[n]["acked_main"]), False)
                for n in SIDES
            )
        )
        for name, check in zip(SIDES, checks, strict=True):
            got[name] |= check
        return got

    async def lookups(self) -> tuple[float, float]:
        url = self.servers["token"].url + "/metrics"
        async with client_session() as session, session.get(url) as response:
            text = await response.text()
        return (
            metric_value(text, "increment_token_lookups_total") or 0.0,
            metric_value(text, "increment_token_lookup_tokens_total") or 0.0,
        )

    async def flood(self, tag: str) -> dict[str, Any]:
        a = self.args
        path = a.out / "flood-tokens.txt"
        path.write_text("\n".join(bad_token() for _ in range(a.flood_tokens)) + "\n")
        before, started = await self.lookups(), time.monotonic()
        flood = wrk(
            self.servers["token"].url, FLOOD_LUA, [f"tokens={path}"], a.flood_seconds,
            a.flood_c, self.logs / f"wrk-{tag}-flood.txt",
        )  # fmt: skip
        cpu = self.servers["token"].cpu_seconds()
        good, bad = await asyncio.gather(self.load("token", f"{tag}-good", a.flood_seconds), flood)
        elapsed = time.monotonic() - started
        after = await self.lookups()
        good = measured(good, self.servers["token"].cpu_seconds() - cpu)
        return {
            "seconds": round(elapsed, 2),
            "bad": bad,
            "bad_rps": bad["requests"] / (bad["duration_us"] / 1e6),
            "lookups_per_s": (after[0] - before[0]) / elapsed,
            "tokens_looked_up_per_s": (after[1] - before[1]) / elapsed,
            "good": {k: good[k] for k in ("rps", "p50", "p99", "non_202", "requests")},
        }


def bad_token() -> str:
    from increment_service.tokens.format import ALPHABET, PREFIX, RANDOM_CHARS, checksum

    body = PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return body + checksum(body)


def markdown(result: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    rounds, flood = result["rounds"], result["flood"]
    exact = {n: sum(bool(r[n]["exact"]) for r in rounds) for n in SIDES}
    lines = [
        f"`{result['service']}` at {result['commit']}; {len(rounds)} paired rounds of"
        f" {result['seconds']} s, wrk -t1 -c{result['c']} per side"
        + (" (A/A baseline: a cookie on both sides)." if result["baseline"] else "."),
        "",
        "| token / cookie | req/s | p50 | p99 | CPU per request |",
        "| --- | --- | --- | --- | --- |",
        "| median (min-max) | " + " | ".join(cell(result["ratios"][k]) for k in RATIOS) + " |",
        "",
        f"Exact rounds (persisted sums equal acknowledgements): cookie {exact['cookie']}/"
        f"{len(rounds)}, token {exact['token']}/{len(rounds)}.",
        "",
        f"Flood ({flood['seconds']} s, -c{result['flood_c']}): {flood['bad_rps']:,.0f} bad"
        f" tokens/s sent ({flood['bad']['s401']} answered 401, {flood['bad']['s503']} 503,"
        f" {flood['bad']['other']} other); Postgres lookup statements"
        f" {flood['lookups_per_s']:,.1f}/s, tokens looked up"
        f" {flood['tokens_looked_up_per_s']:,.0f}/s;"
        f" the good token meanwhile: {flood['good']['rps']:,.0f} req/s, p99"
        f" {flood['good']['p99']:.2f} ms, {flood['good']['non_202']} non-202.",
    ]
    for name, found in result["logs"].items():
        text = ", ".join(f"{k} x{v}" for k, v in found.items()) or "no warnings or errors"
        lines.append(f"- the {name} service's log: {text}")
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    sides = [
        resolve(n, args.service, with_database(args.postgres, f"{args.database}_{n}"))
        for n in SIDES
    ]
    await prepare(args.postgres, sides)
    with services(sides, args.redis, out / "logs") as servers:
        async with client_session() as session:
            await asyncio.gather(*(wait_ready(s, session) for s in servers.values()))
        cookie, _ = await credentials(servers["cookie"].url)
        other_cookie, token = await credentials(servers["token"].url)
        auth = {"cookie": f"cookie={cookie}", "token": f"authorization=Bearer {token}"}
        if args.baseline:  # A/A: both sides with a cookie, to see the noise of the ratios
            auth["token"] = f"cookie={other_cookie}"
        pools = {
            s.name: await asyncpg.create_pool(s.database_url, min_size=1, max_size=2) for s in sides
        }
        try:
            bench = Bench(args, servers, pools, auth)
            tag = f"tokens-{int(time.time())}"
            log(f"warm-up ({args.warmup} s, discarded)")
            await asyncio.gather(*(bench.load(n, f"{tag}-w-{n}", args.warmup) for n in SIDES))
            rounds: list[dict[str, Any]] = []
            for number in range(args.rounds):
                order = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
                got = await bench.round(f"{tag}-r{number}", order)
                ratios = {k: got["token"][k] / got["cookie"][k] for k in RATIOS}
                rounds.append({"round": number, **got, "ratios": ratios})
                log(
                    f"r{number} token/cookie " + " ".join(f"{k} {v:.3f}" for k, v in ratios.items())
                )
            flood = await bench.flood(f"{tag}-flood")
            log(f"flood: {flood['lookups_per_s']:.1f} lookups/s")
        finally:
            for pool in pools.values():
                await pool.close()
    result: dict[str, Any] = {
        "service": args.service,
        "commit": sides[0].commit,
        "seconds": args.seconds,
        "c": args.c,
        "baseline": args.baseline,
        "flood_c": args.flood_c,
        "rounds": rounds,
        "ratios": {k: summary([r["ratios"][k] for r in rounds]) for k in RATIOS},
        "flood": flood,
        "logs": {s.name: log_findings(servers[s.name].log_path) for s in sides},
    }
    (out / "tokens.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "tokens.md").write_text(text)
    print(text)
    return 0 if all(r[n]["exact"] for r in rounds for n in SIDES) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--service", required=True, help="a virtualenv or a source tree")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=10, help="wrk seconds per round")
    parser.add_argument("--warmup", type=int, default=3, help="wrk seconds, discarded")
    parser.add_argument("-c", type=int, default=32, help="wrk connections per service")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="A/A: the token side sends a session cookie too (the ratios' noise floor)",
    )
    parser.add_argument("--flood-seconds", type=int, default=10)
    parser.add_argument("--flood-c", type=int, default=32, help="wrk connections of the flood")
    parser.add_argument("--flood-tokens", type=int, default=200_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--database", default="bench_tokens")
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-tokens")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
