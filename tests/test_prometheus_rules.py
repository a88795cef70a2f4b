"""Static checks of the monitoring configuration in prometheus/ and grafana-provisioning/.

The promtool checks need the `promtool` binary (Debian/Ubuntu package `prometheus`, or
the Prometheus release tarball on PATH) and are skipped without it. The dashboard checks
need nothing but the standard library.

The files' paths and the dashboard's queries come from tests/support/monitoring.py, which
the test against a live Prometheus (test_prometheus_live.py) shares.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.compose import REPO_ROOT
from tests.support.monitoring import (
    DATASOURCE_FILE,
    DEFAULT_SUBSTITUTIONS,
    PROMETHEUS_CONFIG,
    PROVIDER_FILE,
    RULES_DIR,
    RULES_TESTS,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    raw_targets,
    rule_files,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
ALLOWED_UNITS = {"s", "reqps", "short", "percentunit"}

# Metric names the service exposes (the contract in SPEC.md plus the operational
# metrics agreed with the service authors).
HISTOGRAMS = {
    "http_request_duration_seconds",
    "increment_flush_duration_seconds",
    "increment_flush_keys",
    "increment_durable_commit_seconds",
    "increment_durable_group_size",
}
COUNTERS = {
    "increments_total",
    "increment_flush_failures_total",
    "increment_backpressure_rejections_total",
    "increment_overflow_rejected_total",
    "session_logins_total",
    "session_cache_lookups_total",
    "http_protocol_errors_total",
    "user_signups_total",
    "increment_idempotent_replays_total",
    "increment_idempotency_conflicts_total",
    "increment_durable_requests_total",
    "increment_token_checks_total",
    "increment_token_refusals_total",
    "increment_token_lookups_total",
    "increment_token_lookup_tokens_total",
}
GAUGES = {
    "http_requests_in_flight",
    "increment_pending_keys",
    "increment_persist_lag_seconds",
    "event_loop_lag_seconds",
    "process_open_fds",
    "process_max_fds",
    "increment_keyed_items_pending",
}
# Series Prometheus itself attaches to every scrape target.
SYNTHETIC = {"up"}
ALLOWED_SERIES = (
    {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
    | COUNTERS
    | GAUGES
    | SYNTHETIC
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus, or put the promtool "
    "binary of a Prometheus release on PATH)",
)

RANGE_FUNCTIONS = (
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "changes",
    "resets",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "last_over_time",
    "present_over_time",
)
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


# --- helpers ---------------------------------------------------------------------------


def series_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression.

    A small lexical scan, good enough for the dashboard's queries: it drops string
    literals, label matchers, range selectors and grouping clauses, then keeps the
    identifiers that are neither function calls nor keywords.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def run_promtool(*args: str) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run(
        [PROMTOOL, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def alert_names() -> set[str]:
    text = "\n".join(path.read_text(encoding="utf-8") for path in rule_files())
    return set(re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", text, flags=re.MULTILINE))


# --- promtool ----------------------------------------------------------------------------


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    output = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO_ROOT)))
    assert "SUCCESS" in output


@needs_promtool
def test_prometheus_config_loads_every_rule_file() -> None:
    """rule_files is relative to the config, so the glob must find rules/*.yml."""
    output = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO_ROOT)))
    for path in rule_files():
        assert path.name in output, f"{path} is not loaded by prometheus.yml:\n{output}"


@needs_promtool
def test_rules_are_valid() -> None:
    run_promtool("check", "rules", *(str(path.relative_to(REPO_ROOT)) for path in rule_files()))


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    output = run_promtool("test", "rules", str(RULES_TESTS.relative_to(REPO_ROOT)))
    assert "SUCCESS" in output


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    queries = dashboard_queries()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(queries):
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(query)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = run_promtool("check", "rules", str(rules))
    assert f"{len(queries)} rules found" in output


# --- rules and their unit tests ----------------------------------------------------------

EXPECTED_ALERTS = {
    "DurableCommitSlow",
    "ProcessFileDescriptorsNearLimit",
    "IncrementPersistLagHigh",
    "IncrementFlushFailing",
    "HighHttp5xxRatio",
    "HighP99Latency",
    "ReplicaDown",
    "IncrementBackpressure",
    "IncrementOverflowRejected",
}


def test_expected_alerts_exist() -> None:
    assert alert_names() >= EXPECTED_ALERTS


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """Relies on the conventions written at the top of alerts_test.yml."""
    text = RULES_TESTS.read_text(encoding="utf-8")
    cases = re.split(r"^\s*-\s*eval_time:", text, flags=re.MULTILINE)[1:]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        match = re.search(r"^\s*alertname:\s*(\S+)\s*$", case, flags=re.MULTILINE)
        assert match, f"alert_rule_test item without alertname:\n{case}"
        if re.search(r"^\s*exp_alerts:\s*\[\]\s*$", case, flags=re.MULTILINE):
            quiet.add(match.group(1))
        else:
            firing.add(match.group(1))
    names = alert_names()
    assert names - firing == set(), "alerts without a firing unit test"
    assert names - quiet == set(), "alerts without a not-firing unit test"
    assert (firing | quiet) - names == set(), "unit tests for alerts that do not exist"


def test_rules_unit_tests_cover_a_recording_rule() -> None:
    text = RULES_TESTS.read_text(encoding="utf-8")
    recorded = set(
        re.findall(
            r"^\s*-\s*record:\s*(\S+)\s*$",
            (RULES_DIR / "recording.yml").read_text(encoding="utf-8"),
            flags=re.MULTILINE,
        )
    )
    tested = set(re.findall(r"^\s*-\s*expr:\s*(\S+)\s*$", text, flags=re.MULTILINE))
    assert recorded & tested


def test_every_alert_has_severity_summary_and_description() -> None:
    for path in rule_files():
        text = path.read_text(encoding="utf-8")
        for block in re.split(r"^\s*-\s*(?=alert:|record:)", text, flags=re.MULTILINE)[1:]:
            if not block.startswith("alert:"):
                continue
            name = block.split()[1]
            assert re.search(r"^\s*severity:\s*(critical|warning)\s*$", block, re.MULTILINE), (
                f"{name} needs a severity label of critical or warning"
            )
            assert re.search(r"^\s*summary:", block, re.MULTILINE), f"{name} needs a summary"
            assert re.search(r"^\s*description:", block, re.MULTILINE), (
                f"{name} needs a description"
            )


# --- Grafana provisioning ---------------------------------------------------------------


def test_datasource_is_provisioned_with_pinned_uid() -> None:
    text = DATASOURCE_FILE.read_text(encoding="utf-8")
    assert re.search(r"^\s*uid:\s*prometheus\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*type:\s*prometheus\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*isDefault:\s*true\s*$", text, re.MULTILINE)


def test_dashboard_provider_points_at_provisioning_directory() -> None:
    text = PROVIDER_FILE.read_text(encoding="utf-8")
    assert re.search(r"^\s*type:\s*file\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*path:\s*/etc/grafana/provisioning/dashboards\s*$", text, re.MULTILINE)


def test_dashboard_identity() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "increment-service"
    assert dashboard["schemaVersion"] == 39
    ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_datasource_and_unit() -> None:
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel.get("datasource") == DATASOURCE, title
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, title
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in ALLOWED_UNITS, f"{title}: unit {unit!r}"


def test_template_variables_use_the_provisioned_datasource() -> None:
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_dashboard_queries_use_only_exposed_metrics() -> None:
    for title, expr in raw_targets():
        names = series_names(substitute(expr, DEFAULT_SUBSTITUTIONS))
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= ALLOWED_SERIES, f"{title}: unknown metrics {names - ALLOWED_SERIES}"


def test_dashboard_shows_every_exposed_metric() -> None:
    used = set().union(*(series_names(query) for query in dashboard_queries()))
    base = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert (HISTOGRAMS | COUNTERS | GAUGES) - base == set()


def test_dashboard_rates_use_rate_interval() -> None:
    calls = re.compile(r"\b(?:" + "|".join(RANGE_FUNCTIONS) + r")\s*\(")
    for title, expr in raw_targets():
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert all(window == "$__rate_interval" for window in windows), (
            f"{title}: range {windows} instead of [$__rate_interval] in {expr!r}"
        )
        assert len(windows) == len(calls.findall(expr)), f"{title}: {expr!r}"


def test_persist_lag_panel_has_ten_second_threshold_line() -> None:
    panels = [
        panel
        for panel in iter_panels(load_dashboard()["panels"])
        if panel["type"] == "timeseries"
        and any("increment_persist_lag_seconds" in t["expr"] for t in panel["targets"])
    ]
    assert panels
    for panel in panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "s"
        assert any(step["value"] == 10 for step in defaults["thresholds"]["steps"])
        assert defaults["custom"]["thresholdsStyle"]["mode"] in {"line", "dashed", "line+area"}


def test_dashboard_queries_substitutes_variables() -> None:
    queries = dashboard_queries({"$__rate_interval": "30s", "instance": "10.0.0.2:3333"})
    assert queries
    assert all("$" not in query for query in queries)
    assert any("[30s]" in query for query in queries)
    assert any('instance=~"10.0.0.2:3333"' in query for query in queries)
    assert len(queries) == len(dashboard_queries())


def test_substitute_rejects_unknown_variables() -> None:
    with pytest.raises(ValueError, match=r"\$cluster"):
        substitute('up{cluster="$cluster"}', DEFAULT_SUBSTITUTIONS)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        (
            'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route=~"/x|y"}[1m])))',
            {"a_bucket"},
        ),
        ("sum(rate(a_total[5m] offset 1h)) / on (job) group_left b", {"a_total", "b"}),
        ("x > bool 1e3 and y unless z or Inf", {"x", "y", "z"}),
        ('max without (pid) (lag{job="a b (c)"}) * 2', {"lag"}),
    ],
)
def test_series_names(expr: str, expected: set[str]) -> None:
    assert series_names(expr) == expected
