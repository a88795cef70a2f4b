"""prometheus/ and grafana-provisioning/: where their files are, the rule files, and the
provisioned dashboard's panels and PromQL queries (Grafana's variables substituted, so that a
live Prometheus can run them)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.support.compose import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULES_TESTS = PROMETHEUS_DIR / "tests" / "alerts_test.yml"
GRAFANA_DIR = REPO_ROOT / "grafana-provisioning"
DATASOURCE_FILE = GRAFANA_DIR / "datasources" / "prometheus.yml"
PROVIDER_FILE = GRAFANA_DIR / "dashboards" / "provider.yml"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "increment-service.json"

# The values a live test can use for the dashboard's variables.
DEFAULT_SUBSTITUTIONS: Mapping[str, str] = {
    "__rate_interval": "1m",
    "job": "increment-service",
    "instance": ".*",
}

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def rule_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict), f"{DASHBOARD_FILE.name} is not an object"
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those collapsed inside a row."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def raw_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus query of the dashboard, unsubstituted."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def substitute(expr: str, substitutions: Mapping[str, str]) -> str:
    """Replace Grafana variables (`$name`, `${name}`, `${name:format}`) in one query.

    Keys may be given with or without the leading `$`. An unknown variable raises
    ValueError rather than leaving a query Prometheus cannot parse.
    """
    values = {key.lstrip("$"): value for key, value in substitutions.items()}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"no substitution for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_queries(substitutions: Mapping[str, str] | None = None) -> list[str]:
    """Every panel query of the dashboard with Grafana variables substituted.

    Without an argument the variables get DEFAULT_SUBSTITUTIONS
    (`$__rate_interval` -> `1m`, `$job` -> `increment-service`, `$instance` -> `.*`);
    a mapping given here is applied on top of those defaults.
    """
    values = dict(DEFAULT_SUBSTITUTIONS)
    if substitutions:
        values.update({key.lstrip("$"): value for key, value in substitutions.items()})
    return [substitute(expr, values) for _, expr in raw_targets()]
