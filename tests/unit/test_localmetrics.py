"""localmetrics.py alone: counters and histograms in plain numbers, their snapshots, and the
collector that sums the workers' files with its own live numbers (WORKERS > 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from increment_service.localmetrics import (
    LocalCollector,
    LocalCounter,
    LocalHistogram,
    snapshot,
    write_snapshot,
)


def exposition(collector: LocalCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    samples: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_a_counter_counts_per_label_set() -> None:
    plain = LocalCounter("plain", "doc")
    plain.inc()
    plain.inc(2.5)
    assert plain.snapshot() == [[[], 3.5]]
    labelled = LocalCounter("by_outcome", "doc", ["outcome"])
    labelled.labels("ok").inc()
    labelled.labels(outcome="ok").inc(2)
    labelled.labels("error").inc()
    assert labelled.snapshot() == [[["ok"], 3.0], [["error"], 1.0]]
    with pytest.raises(ValueError, match="has labels"):
        labelled.inc()
    with pytest.raises(ValueError, match=r"takes labels \('outcome',\), got \('a', 'b'\)"):
        labelled.labels("a", "b")


def test_a_histogram_puts_a_value_equal_to_a_bound_in_that_bucket() -> None:
    histogram = LocalHistogram("took", "doc", [], buckets=[1.0, 0.5])  # sorted on the way in
    assert histogram.upper == (0.5, 1.0)
    for value in (0.5, 0.50001, 1.0, 7.0, 0.0):
        histogram.observe(value)
    [[labels, counts, total]] = histogram.snapshot()
    assert (labels, counts) == ([], [2, 2, 1])  # <=0.5, <=1.0, +Inf: per bucket
    assert total == pytest.approx(9.00001)
    labelled = LocalHistogram("took_by", "doc", ["route"], buckets=[1.0])
    with pytest.raises(ValueError, match="has labels"):
        labelled.observe(1.0)
    labelled.labels("/increment").observe(2.0)
    assert labelled.snapshot() == [[["/increment"], [0, 1], 2.0]]


def test_one_worker_exposes_its_live_numbers_with_cumulative_buckets() -> None:
    counter = LocalCounter("requests", "doc", ["code"])
    histogram = LocalHistogram("latency", "doc", [], buckets=[0.1, 1.0])
    counter.labels("202").inc(3)
    histogram.observe(0.05)
    histogram.observe(0.5)
    samples = exposition(LocalCollector([counter, histogram]))
    assert samples['requests_total{code="202"}'] == 3.0
    assert samples['latency_bucket{le="0.1"}'] == 1.0
    assert samples['latency_bucket{le="1.0"}'] == 2.0
    assert samples['latency_bucket{le="+Inf"}'] == 2.0
    assert samples["latency_count"] == 2.0
    assert samples["latency_sum"] == pytest.approx(0.55)


def test_a_scrape_sums_every_workers_numbers_series_by_series(tmp_path: Path) -> None:
    def metrics() -> tuple[LocalCounter, LocalHistogram]:
        return (
            LocalCounter("requests", "doc", ["code"]),
            LocalHistogram("latency", "doc", [], buckets=[0.1, 1.0]),
        )

    mine_counter, mine_histogram = metrics()
    mine_counter.labels("202").inc(1)
    mine_histogram.observe(0.05)
    other_counter, other_histogram = metrics()
    other_counter.labels("202").inc(10)
    other_counter.labels("503").inc(2)  # a series only the other worker has
    other_histogram.observe(5.0)
    write_snapshot([other_counter, other_histogram], str(tmp_path), pid=os.getpid() + 1)
    # This worker's own file is stale by design: its live numbers count, not the file.
    stale_counter, _ = metrics()
    stale_counter.labels("202").inc(1000)
    write_snapshot([stale_counter], str(tmp_path), pid=os.getpid())
    (tmp_path / "local-999999.json").write_text("{half a write")  # being replaced: skipped
    (tmp_path / "other.json").write_text(json.dumps({"requests": [[["202"], 1e6]]}))

    samples = exposition(LocalCollector([mine_counter, mine_histogram], str(tmp_path)))
    assert samples['requests_total{code="202"}'] == 11.0
    assert samples['requests_total{code="503"}'] == 2.0
    assert samples['latency_bucket{le="0.1"}'] == 1.0
    assert samples['latency_bucket{le="1.0"}'] == 1.0
    assert samples['latency_bucket{le="+Inf"}'] == 2.0
    assert samples["latency_sum"] == pytest.approx(5.05)
    # Summing never changes the live numbers.
    assert snapshot([mine_counter]) == {"requests": [[["202"], 1.0]]}


def test_a_snapshot_file_is_replaced_whole(tmp_path: Path) -> None:
    counter = LocalCounter("requests", "doc")
    counter.inc(4)
    write_snapshot([counter], str(tmp_path), pid=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-7.json"]
    assert json.loads((tmp_path / "local-7.json").read_text()) == {"requests": [[[], 4.0]]}
