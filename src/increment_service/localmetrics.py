"""Metrics counted in plain numbers of this process, and the collector that exposes them.

prometheus_client takes a lock on every update, and with ``WORKERS > 1`` writes it to a file
shared between the workers: on the request path that cost a few per cent of a request. The
metrics a request updates are counted here instead, in plain Python numbers (one event loop,
no lock needed). ``LocalCollector`` turns them into Prometheus families at scrape time; with
several workers, each worker's sampler writes its numbers to ``local-<pid>.json`` in the
multiprocess directory twice a second, and a scrape sums those files with the scraping worker's
own live numbers. Counters and histograms only: what a request sets, it counts.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LocalCounter:
    """A counter family; ``name`` without the ``_total`` suffix, as prometheus_client's."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.children: dict[Labels, CounterChild] = {}
        self._unlabelled = None if labelnames else self.labels()

    def labels(self, *values: str, **named: str) -> CounterChild:
        if named:  # set-up code may name them, as with prometheus_client
            values = tuple(named[name] for name in self.labelnames)
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        if self._unlabelled is None:
            raise ValueError(f"{self.name} has labels: use .labels(...).inc()")
        self._unlabelled.value += amount

    def snapshot(self) -> list[list[Any]]:
        return [[list(labels), child.value] for labels, child in self.children.items()]


class HistogramChild:
    __slots__ = ("_upper", "counts", "sum")

    def __init__(self, upper: tuple[float, ...]) -> None:
        self._upper = upper
        self.counts = [0] * (len(upper) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect.bisect_left(self._upper, value)] += 1
        self.sum += value


class LocalHistogram:
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.upper = tuple(sorted(buckets))
        self.children: dict[Labels, HistogramChild] = {}

    def labels(self, *values: str, **named: str) -> HistogramChild:
        if named:  # set-up code may name them, as with prometheus_client
            values = tuple(named[name] for name in self.labelnames)
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = HistogramChild(self.upper)
        return child

    def snapshot(self) -> list[list[Any]]:
        return [
            [list(labels), list(child.counts), child.sum] for labels, child in self.children.items()
        ]


LocalMetric = LocalCounter | LocalHistogram


def snapshot(metrics: Iterable[LocalMetric]) -> dict[str, list[list[Any]]]:
    return {metric.name: metric.snapshot() for metric in metrics}


def write_snapshot(metrics: Iterable[LocalMetric], directory: str, pid: int) -> None:
    """This process's numbers, for the other workers' scrapes (replaced atomically)."""
    path = Path(directory) / f"local-{pid}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(snapshot(metrics)))
    os.replace(temporary, path)


def _read_snapshots(directory: str, own_pid: int) -> Iterator[dict[str, list[list[Any]]]]:
    for path in Path(directory).glob("local-*.json"):
        if path.name == f"local-{own_pid}.json":
            continue
        with contextlib.suppress(OSError, ValueError):  # a worker's file being replaced
            yield json.loads(path.read_text())


class LocalCollector(Collector):
    """Exposes ``metrics``: this process's live numbers, plus, with ``directory``, the numbers
    the other workers wrote there."""

    def __init__(self, metrics: Sequence[LocalMetric], directory: str | None = None) -> None:
        self.metrics = metrics
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        totals = snapshot(self.metrics)
        if self.directory is not None:
            for other in _read_snapshots(self.directory, os.getpid()):
                _add(totals, other)
        for metric in self.metrics:
            rows = totals.get(metric.name, [])
            if isinstance(metric, LocalCounter):
                counter = CounterMetricFamily(
                    metric.name, metric.documentation, labels=metric.labelnames
                )
                for labels, value in rows:
                    counter.add_metric(labels, value)
                yield counter
            else:
                histogram = HistogramMetricFamily(
                    metric.name, metric.documentation, labels=metric.labelnames
                )
                bounds = [*map(floatToGoString, metric.upper), "+Inf"]
                for labels, counts, total in rows:
                    cumulative, running = [], 0
                    for bound, count in zip(bounds, counts, strict=True):
                        running += count
                        cumulative.append((bound, float(running)))
                    histogram.add_metric(labels, cumulative, total)
                yield histogram


def _add(totals: dict[str, list[list[Any]]], other: dict[str, list[list[Any]]]) -> None:
    """Add another worker's rows into ``totals``, series by series (matched on labels)."""
    for name, rows in other.items():
        mine = {tuple(row[0]): row for row in totals.setdefault(name, [])}
        for row in rows:
            found = mine.get(tuple(row[0]))
            if found is None:
                totals[name].append(row)
                mine[tuple(row[0])] = row
            elif len(row) == 2:  # a counter: [labels, value]
                found[1] += row[1]
            else:  # a histogram: [labels, counts, sum]
                found[1] = [a + b for a, b in zip(found[1], row[1], strict=True)]
                found[2] += row[2]
