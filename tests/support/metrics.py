"""Samples of a Prometheus text exposition, parsed by prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import http_get


def metric_value(exposition: str, sample: str) -> float | None:
    """The sum of every series of ``sample`` (e.g. ``increment_flush_failures_total``) in a
    Prometheus text exposition, or None when the exposition has no such sample."""
    values = [
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == sample
    ]
    return sum(values) if values else None


def scrape_metric(url: str, sample: str) -> float | None:
    """``sample`` summed over its series in ``url``'s /metrics (None when absent)."""
    status, body = http_get(url + "/metrics")
    assert status == 200, f"{url}/metrics answered {status}"
    return metric_value(body.decode(), sample)
