"""Samples of a Prometheus text exposition, parsed by prometheus_client's own parser."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import http_get

#: ``name`` or ``name{label="value",...}``: a sample, and optionally the one series of it.
_SELECTOR = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def _selector(sample: str) -> tuple[str, dict[str, str] | None]:
    match = _SELECTOR.fullmatch(sample)
    assert match is not None, f"not a sample: {sample!r}"
    if match["labels"] is None:
        return match["name"], None
    labels = dict(_LABEL.findall(match["labels"]))
    assert _LABEL.sub("", match["labels"]) == "", f"not a sample: {sample!r}"
    return match["name"], labels


def metric_value(exposition: str, sample: str) -> float | None:
    """In a Prometheus text exposition: the sum of every series of ``sample`` (e.g.
    ``increment_flush_failures_total``), or, given labels (``session_logins_total{outcome=
    "success"}``), the one series with exactly those; None when there is no such sample."""
    name, labels = _selector(sample)
    values = [
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name and (labels is None or s.labels == labels)
    ]
    return sum(values) if values else None


def scrape_metric(url: str, sample: str) -> float | None:
    """``sample`` summed over its series in ``url``'s /metrics (None when absent)."""
    status, body = http_get(url + "/metrics")
    assert status == 200, f"{url}/metrics answered {status}"
    return metric_value(body.decode(), sample)


async def app_metric(client: TestClient[Any, Any], sample: str) -> float:
    """``sample`` (as metric_value reads it) in the /metrics of an in-process app; fails when
    /metrics does not answer 200 or has no such sample."""
    response = await client.get("/metrics")
    assert response.status == 200
    value = metric_value(await response.text(), sample)
    assert value is not None, f"/metrics has no {sample}"
    return value
