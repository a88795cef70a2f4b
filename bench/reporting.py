"""What a run found, told: ratios to the ceiling and the naive design, the targets of the
issue met or missed, the machine, results.md, the plot, and the progress line per scenario."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from bench.config import (
    CEILING,
    DEFAULT_FLUSH_INTERVAL,
    NAIVE,
    REPO,
    SERVICE,
    SERVICE_LOG,
    SESSION,
    Config,
)
from bench.driving import Correctness, Freshness, ScenarioResult
from bench.flush import FlushResult


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
