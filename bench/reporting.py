"""What a run found, told: ratios to the two ceilings and the naive design, the targets of the
issue met or missed, the machine, results.md, the plot, and the progress lines."""

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
    BARE,
    BARE_AGAIN,
    DEFAULT_FLUSH_INTERVAL,
    NAIVE,
    ORDER,
    REPO,
    SERVICE,
    SERVICE_LOG,
    SESSION,
    STRICT,
    Config,
)
from bench.driving import Correctness, Freshness, ScenarioResult
from bench.flush import FlushResult


def progress_line(r: ScenarioResult) -> str:
    line = f"{r.label:28} {r.rps:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms"
    if r.correctness is not None:
        c = r.correctness
        line += f"  acked {c.acknowledged} persisted {c.persisted} {'=' if c.equal else '!='}"
    if r.freshness is not None and r.freshness.oldest_age_p99_s is not None:
        f = r.freshness
        line += f"  oldest p99 {f.oldest_age_p99_s:.2f}s max {f.oldest_age_max_s:.2f}s"
    return line + f"  cpu {r.cpu_cores}"


def open_loop_line(run: dict[str, Any]) -> str:
    latency, lag = run["latency"], run["generator_lag"]
    return (
        f"open loop {run['path']:15} {run['offered_rate']:7.0f}/s offered, "
        f"{run['achieved_rate']:7.0f}/s answered  p50 {fmt(latency['p50_ms'])} ms  "
        f"p99 {fmt(latency['p99_ms'])} ms  max {fmt(latency['max_ms'])} ms  "
        f"generator lag p99 {fmt(lag['p99_ms'])} ms  statuses {run['statuses']}"
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def add_ratios(results: list[ScenarioResult]) -> None:
    """Each scenario's ratios to the ceilings and the naive design of its group (same worker
    count and key range). The bare ceiling's figure is the mean of its two runs (first and
    last of the group)."""
    ok = [r for r in results if r.status == "ok"]
    by = {(r.system, r.workers, r.keys): r for r in ok}
    for r in ok:
        group = (r.workers, r.keys)
        bares = [by[(s, *group)] for s in (BARE, BARE_AGAIN) if (s, *group) in by]
        bare_rps = _mean([b.rps for b in bares if b.rps])
        bare_cpu = _mean([b.cpu_us_per_request for b in bares if b.cpu_us_per_request])
        strict = by.get((STRICT, *group))
        naive = by.get((NAIVE, *group))
        if bare_rps:
            r.vs_bare = round(r.rps / bare_rps, 3)
        if bare_cpu and r.cpu_us_per_request:
            r.cpu_vs_bare = round(bare_cpu / r.cpu_us_per_request, 3)
        if strict and strict.rps and r.system not in (BARE, BARE_AGAIN):
            r.vs_strict = round(r.rps / strict.rps, 3)
            if strict.cpu_us_per_request and r.cpu_us_per_request:
                r.cpu_vs_strict = round(strict.cpu_us_per_request / r.cpu_us_per_request, 3)
        if naive and naive.rps and r.system != NAIVE:
            r.vs_naive = round(r.rps / naive.rps, 2)


def bare_drift(results: list[ScenarioResult]) -> dict[tuple[int, int], float]:
    """Per group: the bare ceiling's second run over its first (1.00: the machine was as
    quiet, or as busy, at the end of the group as at its start)."""
    by = {(r.system, r.workers, r.keys): r for r in results if r.status == "ok"}
    drift = {}
    for (system, workers, keys), first in by.items():
        again = by.get((BARE_AGAIN, workers, keys))
        if system == BARE and again and first.rps:
            drift[(workers, keys)] = round(again.rps / first.rps, 3)
    return drift


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
        "steady_s": config.steady,
        "parts": list(config.parts),
        "systems": list(config.systems),
        "quick": config.quick,
        "wrk_threads": config.threads,
        "wrk_connections": config.connections,
        "drain_s": {
            "duration": config.drain(config.duration),
            "steady": config.drain(config.steady),
        },
        "flush_interval_s": DEFAULT_FLUSH_INTERVAL,
        "open_loop": {
            "fractions": list(config.open_fractions),
            "rates": list(config.open_rates),
            "duration_s": config.open_duration,
            "connections": config.open_connections,
            "workers": config.open_workers,
        },
        "profiled": config.profile,
        "service_pythonpath": config.service_pythonpath,
        "service_commit": service_commit(config.service_pythonpath),
    }


def service_commit(pythonpath: str | None) -> str | None:
    """The commit of the tree the service ran from, with --service-pythonpath."""
    if not pythonpath:
        return None
    found = subprocess.run(
        ["git", "-C", pythonpath, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or None


@dataclasses.dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured
    informative: bool = False  # a figure to read beside the targets, not one of them

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Issue 12's throughput targets, against the bare ceiling: (system, goal, what).
RATIO_GOALS = (
    (SERVICE, 0.8, "/increment (ACCESS_LOG=false)"),
    (SERVICE_LOG, 0.7, "/increment (ACCESS_LOG=true)"),
    (SESSION, 0.7, "/api/increment with a session"),
)
FRESHNESS_P99_S, FRESHNESS_MAX_S = 3.0, 10.0
FLUSH_100K_S = 1.2
OPEN_LOOP_P99_FACTOR = 2.0


def _ratio_target(
    name: str, goal: float, rows: list[ScenarioResult], attr: str, informative: bool = False
) -> Target:
    values = [(r, getattr(r, attr)) for r in rows if getattr(r, attr) is not None]
    if not values:
        return Target(name, f">= {goal}", "not measured", None, informative)
    measured = ", ".join(f"w{r.workers} k{r.keys}: {v:.2f}" for r, v in values)
    return Target(name, f">= {goal}", measured, all(v >= goal for _, v in values), informative)


def _open_loop_targets(open_runs: list[dict[str, Any]]) -> list[Target]:
    done = [run for run in open_runs if "latency" in run]
    rates = sorted({run["offered_rate"] for run in done})
    targets = []
    for rate in rates:
        at = {run["system"]: run for run in done if run["offered_rate"] == rate}
        name = f"/api/increment p99 <= {OPEN_LOOP_P99_FACTOR:g}x /increment's at {rate:,.0f}/s"
        goal = f"<= {OPEN_LOOP_P99_FACTOR:g}x"
        if SERVICE not in at or SESSION not in at:
            targets.append(Target(name, goal, "not measured", None))
            continue
        fraction = at[SERVICE].get("fraction")
        if fraction:
            name += f" ({fraction:.0%} of the service's wrk throughput, open loop)"
        plain, session = at[SERVICE]["latency"]["p99_ms"], at[SESSION]["latency"]["p99_ms"]
        if not plain or session is None:
            targets.append(Target(name, goal, "no latencies", None))
            continue
        targets.append(
            Target(
                name,
                goal,
                f"{session:.1f} ms vs {plain:.1f} ms: {session / plain:.2f}x",
                session <= OPEN_LOOP_P99_FACTOR * plain,
            )
        )
    return targets


def _freshness_targets(fresh: list[ScenarioResult]) -> list[Target]:
    targets = []
    for label, attr_p99, attr_max in (
        ("lag gauge", "gauge_p99_s", "gauge_max_s"),
        ("probe oldest-unpersisted age", "oldest_age_p99_s", "oldest_age_max_s"),
    ):
        rows = [
            (r, getattr(r.freshness, attr_p99), getattr(r.freshness, attr_max))
            for r in fresh
            if getattr(r.freshness, attr_p99) is not None
        ]
        if not rows:
            continue
        worst_p99 = max(rows, key=lambda row: row[1])
        worst_max = max(rows, key=lambda row: row[2])
        missed = [
            r.label for r, p99, top in rows if p99 >= FRESHNESS_P99_S or top >= FRESHNESS_MAX_S
        ]
        samples = min(
            (r.freshness.gauge_samples if attr_p99 == "gauge_p99_s" else r.freshness.probes)
            for r, _, _ in rows
            if r.freshness is not None
        )
        measured = (
            f"worst p99 {worst_p99[1]:.2f} s ({worst_p99[0].label}), worst max "
            f"{worst_max[2]:.2f} s ({worst_max[0].label}); >= {samples} samples per scenario"
        )
        if missed:
            measured += f"; missed: {', '.join(missed)}"
        targets.append(
            Target(
                f"freshness ({label}), every service scenario",
                f"p99 < {FRESHNESS_P99_S:g} s, max < {FRESHNESS_MAX_S:g} s",
                measured,
                not missed,
            )
        )
    return targets


def evaluate_targets(
    results: list[ScenarioResult],
    open_runs: list[dict[str, Any]],
    flush: list[FlushResult],
) -> list[dict[str, Any]]:
    ok = [r for r in results if r.status == "ok"]
    targets: list[Target] = []
    for system, goal, what in RATIO_GOALS:
        rows = [r for r in ok if r.system == system]
        targets.append(_ratio_target(f"{what} vs the bare ceiling", goal, rows, "vs_bare"))
    targets += _open_loop_targets(open_runs)
    targets += _freshness_targets([r for r in ok if r.freshness is not None])
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
                    f"100k-key flush ({f.case}), measured alone",
                    f"< {FLUSH_100K_S:g} s",
                    f"{f.median_s:.3f} s (median of {len(f.seconds)}: "
                    f"{', '.join(f'{x:.2f}' for x in f.seconds)})",
                    f.median_s < FLUSH_100K_S,
                    informative=f.case != "update",  # the target is the update
                )
            )
    # Beside the targets: the same ratios against the strict ceiling (the earlier reference),
    # in CPU per request (less sensitive to noise), and what strict parsing costs.
    for system, goal, what in RATIO_GOALS:
        rows = [r for r in ok if r.system == system]
        targets.append(
            _ratio_target(f"{what} vs the strict ceiling", goal, rows, "vs_strict", True)
        )
    for system, goal, what in RATIO_GOALS:
        rows = [r for r in ok if r.system == system]
        targets.append(
            _ratio_target(
                f"{what} vs the bare ceiling in CPU per request", goal, rows, "cpu_vs_bare", True
            )
        )
    strict = [r for r in ok if r.system == STRICT and r.vs_bare is not None]
    if strict:
        targets.append(
            Target(
                "strict ceiling vs the bare one: what the contract's parsing costs",
                "-",
                ", ".join(f"w{r.workers} k{r.keys}: {r.vs_bare:.2f}" for r in strict),
                None,
                informative=True,
            )
        )
    ceilings = {(r.workers, r.keys): r for r in ok if r.system == BARE}
    service = [r for r in ok if r.system == SERVICE]
    for keys, goal, name in ((1000, 4, "vs naive at 1000 keys"), (1, 10, "vs naive on 1 hot key")):
        rows = [r for r in service if r.keys == keys and r.vs_naive is not None]
        if not rows:
            continue
        parts = []
        for r in rows:
            bound = ceilings.get((r.workers, r.keys))
            limit = f" (bare ceiling: {bound.vs_naive:.1f})" if bound and bound.vs_naive else ""
            parts.append(f"w{r.workers} k{r.keys}: {r.vs_naive:.2f}{limit}")
        met = all(r.vs_naive is not None and r.vs_naive >= goal for r in rows)
        targets.append(
            Target(f"{name} (an earlier target)", f">= {goal}", ", ".join(parts), met, True)
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


def _ratio_rows(rows: list[ScenarioResult]) -> list[str]:
    """The summary: per group, the bare ceiling's req/s and every system's ratio to it (and to
    the strict ceiling)."""
    by = {(r.system, r.workers, r.keys): r for r in rows if r.status == "ok"}
    drift = bare_drift(rows)
    systems = (STRICT, SERVICE, SERVICE_LOG, SESSION, NAIVE)
    out = [
        "| workers / keys | bare req/s | strict | `/increment` | with access log "
        "| `/api/increment` + session | naive | bare drift |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workers, keys in sorted({(r.workers, r.keys) for r in rows}):
        bare = by.get((BARE, workers, keys))
        cells = []
        for system in systems:
            r = by.get((system, workers, keys))
            if r is None or r.vs_bare is None:
                cells.append("-")
            elif system == STRICT:
                cells.append(f"{r.vs_bare:.2f}")
            else:
                cells.append(f"{r.vs_bare:.2f} ({fmt(r.vs_strict)})")
        out.append(
            f"| {workers} / {keys:,} | {fmt(bare.rps if bare else None, ',.0f')} | "
            + " | ".join(cells)
            + f" | {fmt(drift.get((workers, keys)))} |"
        )
    return out


def _open_loop_rows(openloop: dict[str, Any]) -> list[str]:
    runs = openloop.get("runs", [])
    if not runs:
        return []
    out = [
        "",
        "## Same offered load: open loop (`bench/openloop.py`)",
        "",
        f"Rates: {', '.join(f'{f:.0%}' for f in {r.get('fraction') for r in runs} if f)} of "
        f"{openloop.get('basis', '')}. Each run sends at a fixed rate for its duration (the "
        "first seconds are warm-up, left out); latency is measured from each request's "
        "*scheduled* send time to the end of its answer, so queueing behind a slow answer "
        "counts (no coordinated omission). Service time is from the actual write (what a "
        "closed loop like wrk measures); generator lag is how late the generator itself took "
        "a request up (it counts in the latency: large values mean the figures are "
        "pessimistic). The two paths alternate which goes first at each rate.",
        "",
        "| path | workers | offered /s | answered /s | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| max ms | service time p99 ms | generator lag p99 ms | statuses | lost "
        "| CPU cores server / generator |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| ---: | --- |",
    ]
    for run in runs:
        if "latency" not in run:
            out.append(f"| {run['system']} at {run['rate']:,.0f}/s | {run['skipped']} |")
            continue
        lat = run["latency"]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(run["statuses"].items()))
        if run["errors"]:
            statuses += "; errors " + ", ".join(f"{k}: {v}" for k, v in run["errors"].items())
        out.append(
            f"| `{run['path']}` | {run['workers']} | {run['offered_rate']:,.0f} | "
            f"{run['achieved_rate']:,.0f} | {fmt(lat['p50_ms'])} | {fmt(lat['p90_ms'])} | "
            f"{fmt(lat['p99_ms'])} | {fmt(lat['p999_ms'])} | {fmt(lat['max_ms'], '.1f')} | "
            f"{fmt(run['service_time']['p99_ms'])} | {fmt(run['generator_lag']['p99_ms'])} | "
            f"{statuses} | {run['lost']} | {fmt(run.get('server_cpu_cores'))} / "
            f"{fmt(run['generator_cpu_s'] / run['duration_s'])} |"
        )
    return out


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    rows = [scenario_from_dict(r) for r in data["scenarios"]]
    service_from = (
        f" The service ran from `{meta['service_pythonpath']}`"
        + (f" (commit {meta['service_commit']})" if meta.get("service_commit") else "")
        + ", and so did the flush cost."
        if meta.get("service_pythonpath")
        else ""
    )
    systems = meta.get("systems", list(ORDER))
    systems_note = "" if systems == list(ORDER) else f"; systems: {', '.join(systems)}"
    out = [
        "# increment-service benchmark results",
        "",
        f"Run {meta['run_id']} at {meta['started']} on commit {meta['commit']}: "
        f"{meta['nproc']} x {meta['cpu_model']}, Python {meta['python']}, {meta['wrk']}; "
        f"wrk -t{meta['wrk_threads']} -c{meta['wrk_connections']}, {meta['duration_s']} s per "
        f"ceiling and naive scenario, {meta['steady_s']} s per service scenario"
        f"{' (quick)' if meta['quick'] else ''}"
        f"{', PROFILED (py-spy attached: figures depressed)' if meta['profiled'] else ''}; "
        f"parts: {', '.join(meta['parts'])}{systems_note}.{service_from}",
        "",
        "Every figure that compares is a ratio to references measured in this run, seconds "
        "apart, interleaved: the **bare** ceiling (`bench/bare.py`: orjson, two type checks, "
        "no middleware; the mean of its two runs, first and last of each worker count and key "
        "range) and the **strict** one (`bench/ceiling.py`: the contract's parsing). Client, "
        "servers and Postgres share the machine's cores; *bare drift* (the bare ceiling's "
        "second run over its first) and the `other` CPU column (everything not ours, plus "
        "Postgres) show the noise. Server CPU per request depends less on it than throughput.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in data["targets"]:
        met = {True: "yes", False: "**NO**", None: "not measured"}[t["met"]]
        if t.get("informative"):
            met = {True: "(yes)", False: "(no)", None: "-"}[t["met"]]
        out.append(f"| {t['name']} | {t['goal']} | {t['measured']} | {met} |")
    out += [
        "",
        "Rows with the answer in brackets are informative, not targets.",
        "",
        "## Ratios to the bare ceiling (to the strict one in brackets)",
        "",
        *_ratio_rows(rows),
        "",
        "## Throughput and latency (wrk, closed loop)",
        "",
        "| system | workers | keys | wrk s | req/s | p50 ms | p99 ms | max ms | vs bare "
        "| vs strict | vs naive | server CPU us/req (vs bare) | non-202 / errors "
        "| RSS MiB per worker | CPU cores server / wrk / other |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| --- | --- | --- |",
    ]
    for r in rows:
        if r.status != "ok":
            continue
        errors = sum(r.errors.values())
        cpu = r.cpu_cores
        out.append(
            f"| {r.system} | {r.workers} | {r.keys} | {r.duration_s:.0f} | {r.rps:,.0f} | "
            f"{fmt(r.p50_ms)} | {fmt(r.p99_ms)} | {fmt(r.max_ms, '.0f')} | {fmt(r.vs_bare)} | "
            f"{fmt(r.vs_strict)} | {fmt(r.vs_naive, '.1f', 'x')} | "
            f"{fmt(r.cpu_us_per_request, '.0f')} ({fmt(r.cpu_vs_bare)}) | {r.non_202} / "
            f"{errors} | {', '.join(f'{m:.0f}' for m in r.rss_mib)} | "
            f"{cpu.get('server', 0):.2f} / {cpu.get('wrk', 0):.2f} / {cpu.get('other', 0):.2f} |"
        )
    out += _open_loop_rows(data.get("openloop", {}))
    out += [
        "",
        "## Write-behind: freshness and correctness (service scenarios)",
        "",
        "Over each service scenario's steady load. Lag gauge: `increment_persist_lag_seconds` "
        "scraped every 100 ms. Probe: one increment every 100 ms on a key of its own, Postgres "
        "polled every 100 ms; *oldest* is the age of the oldest acknowledged probe not yet in "
        "Postgres, sampled every 100 ms; *delay* is each probe's time from its 202 to Postgres. "
        "p99 is nearest-rank over the samples (the 6th largest of 600). Acked: wrk's 202s in "
        "the main phase; persisted: sum(counters.value) of those keys after the flush window. "
        "Server check: the service's own `increments_total` over the scenario against every "
        "key it touched.",
        "",
        "| system | workers | keys | samples / probes | lag gauge p99 / max s "
        "| probe oldest p99 / max s | probe delay p99 / max s | acked (wrk 202) | persisted "
        "| equal | waited s | server acked / persisted |",
        "| --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: | --- | ---: | --- |",
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
            f"| {r.system} | {r.workers} | {r.keys} | {f.gauge_samples} / {f.probes} | "
            f"{fmt(f.gauge_p99_s)} / {fmt(f.gauge_max_s)} | {fmt(f.oldest_age_p99_s)} / "
            f"{fmt(f.oldest_age_max_s)} | {fmt(f.probe_delay_p99_s)} / "
            f"{fmt(f.probe_delay_max_s)} | {c.acknowledged} | {c.persisted} | "
            f"{'yes' if c.equal else '**NO**'} | {c.waited_s:.1f} | {server} |"
        )
    if data["flush"] or data.get("flush_error"):
        out += [
            "",
            "## Flush cost (`writebehind.apply_batch`, one batch, measured alone)",
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
    systems = [s for s in (*ORDER,) if any(r["system"] == s for r in rows)]
    groups = sorted({(r["workers"], r["keys"]) for r in rows})
    if not groups:
        return
    by = {(r["system"], r["workers"], r["keys"]): r for r in rows}
    open_runs = [run for run in data.get("openloop", {}).get("runs", []) if "latency" in run]
    fig, axes = plt.subplots(3 if open_runs else 2, 1, figsize=(12, 11.5 if open_runs else 8))
    top, bottom = axes[0], axes[1]
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        ratio = [by.get((system, w, k), {}).get("vs_bare") or 0 for w, k in groups]
        p99 = [by.get((system, w, k), {}).get("p99_ms") or 0 for w, k in groups]
        top.bar(xs, ratio, width, label=system)
        bottom.bar(xs, p99, width, label=system)
    top.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")
    top.axhline(0.7, color="grey", linewidth=0.8, linestyle=":")
    top.set_ylim(0, 1.3)  # room for the legend above the bars
    top.set_ylabel("throughput / bare ceiling")
    top.set_title(
        "POST /increment throughput as a ratio to the bare ceiling (wrk, same run) "
        "— higher is better; targets 0.8 and 0.7 dashed"
    )
    top.legend(ncol=len(systems), fontsize="small")
    bottom.set_ylabel("p99 latency, ms (wrk, closed loop)")
    bottom.set_title("p99 latency at each system's own saturation — lower is better")
    labels = [
        f"{w} worker{'s' if w > 1 else ''}\n{k:,} key{'s' if k > 1 else ''}" for w, k in groups
    ]
    for axis in (top, bottom):
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels(labels)
    if open_runs:
        _plot_open_loop(axes[2], open_runs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_open_loop(axis: Any, runs: list[dict[str, Any]]) -> None:
    rates = sorted({run["offered_rate"] for run in runs})
    by = {(run["system"], run["offered_rate"]): run for run in runs}
    width = 0.2
    bars = ((SERVICE, "p50_ms"), (SERVICE, "p99_ms"), (SESSION, "p50_ms"), (SESSION, "p99_ms"))
    for i, (system, percentile) in enumerate(bars):
        xs = [g + (i - 1.5) * width for g in range(len(rates))]
        values = [
            (by.get((system, rate), {}).get("latency", {}).get(percentile) or 0) for rate in rates
        ]
        path = "/api/increment" if system == SESSION else "/increment"
        axis.bar(xs, values, width, label=f"{path} {percentile.removesuffix('_ms')}")
    axis.set_ylabel("latency, ms (open loop)")
    axis.set_title(
        "Same offered rate (open loop, 1 worker, latency from the scheduled send) — lower is better"
    )
    axis.set_xticks(range(len(rates)))
    axis.set_xticklabels(
        [
            f"{rate:,.0f}/s"
            + (
                f" ({by[(SERVICE, rate)]['fraction']:.0%})"
                if by.get((SERVICE, rate), {}).get("fraction")
                else ""
            )
            for rate in rates
        ]
    )
    axis.legend(ncol=4, fontsize="small")
