"""Exactly once, end to end: a checker in the spirit of Jepsen's counter test.

Three replicas behind nginx (the native topology, compose's settings), a Postgres cluster of
the test's own, and clients that use the shipped ``increment_service.client``: every operation
has an Idempotency-Key of its own and is retried with it until it succeeds (a generous
deadline; an operation that runs out of it fails the test). Meanwhile replicas are stopped or
killed and started again, and Postgres is restarted once. At the end every counter must equal
exactly the sum of its operations: nothing lost, nothing doubled.

The same faults against plain 202s (no key, no retry) show what the write-behind's promise
allows, and no more: persisted never above attempted, never below acknowledged minus what a
killed replica had not flushed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from increment_service.client import IncrementClient, IncrementFailed
from tests.support.load import Traffic
from tests.support.logs import applied_requests
from tests.support.nginx import nginx_binary
from tests.support.polling import eventually
from tests.support.postgres import PgCluster, persisted, wait_until_no_other_backends
from tests.support.processes import ServiceProcess
from tests.support.topology import NativeTopology

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(nginx_binary() is None, reason="nginx (Debian package nginx) is needed"),
]

FLUSH_INTERVAL = 1.0
VARIABLES = {
    "FLUSH_INTERVAL_SECONDS": f"{FLUSH_INTERVAL:g}",
    "WORKERS": "1",
    "SHUTDOWN_TIMEOUT_SECONDS": "8",
    "DURABLE_TIMEOUT_SECONDS": "3",
}
#: At least this long between two faults: several flush intervals of traffic.
STEP_SECONDS = 3.0
#: Between a fault and the start of the replica again.
RESTART_PAUSE = 0.5
CLIENTS = 16
COUNTERS = 20
#: Per operation, the client's total deadline: generous, a failure is a failure.
DEADLINE_SECONDS = 60.0


@dataclasses.dataclass
class History:
    """Every operation the clients finished: (counter key, value), and the failures."""

    done: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    failed: list[IncrementFailed] = dataclasses.field(default_factory=list)
    attempts: Counter[int] = dataclasses.field(default_factory=Counter)

    def totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for key, value in self.done:
            totals[key] += value
        return dict(totals)


async def run_clients(url: str, durable: bool, stop: asyncio.Event, history: History) -> None:
    async def one(n: int) -> None:
        rng = random.Random(n)
        async with IncrementClient(url, deadline=DEADLINE_SECONDS, rng=rng) as client:
            while not stop.is_set():
                key, value = f"c{rng.randrange(COUNTERS):02d}", rng.randint(1, 5)
                try:
                    result = await client.increment(key, value, durable=durable)
                except IncrementFailed as exc:
                    history.failed.append(exc)
                    return
                assert result.status == (204 if durable else 202), result
                assert result.durable == durable
                history.done.append((key, value))
                history.attempts[result.attempts] += 1

    await asyncio.gather(*(one(n) for n in range(CLIENTS)))


async def progress(history: History, more: int, within: float = 60) -> None:
    target = len(history.done) + more

    async def reached() -> bool:
        return len(history.done) >= target

    await eventually(reached, f"{more} more operations done", within=within)


async def restart_postgres(cluster: PgCluster, down_for: float = 2.0) -> None:
    await asyncio.to_thread(cluster.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(cluster.start)


async def with_faults(
    topology: NativeTopology,
    cluster: PgCluster,
    history: History | Callable[[], int],
    fault: Callable[[ServiceProcess], Awaitable[None]],
) -> None:
    """The schedule: each replica in turn gets ``fault`` and is started again, with progress
    between the faults; Postgres is restarted in the middle."""

    async def step() -> None:
        # Some seconds of traffic between faults (several flushes), and some progress.
        await asyncio.sleep(STEP_SECONDS)
        if isinstance(history, History):
            await progress(history, 150)
        else:
            start = history()

            async def moved() -> bool:
                assert callable(history)
                return history() >= start + 300

            await eventually(moved, "300 more acknowledged", within=60)

    await step()
    for n, replica in enumerate(topology.replicas):
        await fault(replica)
        await asyncio.sleep(RESTART_PAUSE)
        await asyncio.to_thread(topology.start_replica, replica)
        await step()
        if n == 1:
            await restart_postgres(cluster)
            await step()


def topology_on(cluster: PgCluster, redis_url: str, tmp_path: Path) -> NativeTopology:
    return NativeTopology(
        tmp_path, database_url=cluster.url, redis_url=redis_url, variables=VARIABLES
    )


@pytest.mark.parametrize("durable", [False, True], ids=["202-with-keys", "durable"])
async def test_every_counter_is_exactly_the_sum_of_its_operations(
    cluster: PgCluster, redis_url: str, tmp_path: Path, durable: bool
) -> None:
    """With keys and retries: through SIGTERM restarts (written behind: a replica flushes
    what it acknowledged before it exits) or SIGKILL (durable: acknowledged means committed),
    and a Postgres restart."""

    async def sigterm(replica: ServiceProcess) -> None:
        replica.signal(signal.SIGTERM)
        assert await asyncio.to_thread(replica.wait, 20) == 0

    async def sigkill(replica: ServiceProcess) -> None:
        replica.signal(signal.SIGKILL)
        await asyncio.to_thread(replica.wait, 10)

    history = History()
    stop = asyncio.Event()
    with topology_on(cluster, redis_url, tmp_path) as topology:
        clients = asyncio.ensure_future(run_clients(topology.url, durable, stop, history))
        try:
            await with_faults(topology, cluster, history, sigkill if durable else sigterm)
        finally:
            stop.set()
            await clients
        topology.stop()  # SIGTERM: the final flushes
    assert await wait_until_no_other_backends(cluster.url) == []
    assert history.failed == [], [str(f) for f in history.failed]
    got = await persisted(cluster.url)
    expected = history.totals()
    assert got == expected, {k: (got.get(k), expected.get(k)) for k in set(got) | set(expected)}
    retried = sum(n for attempts, n in history.attempts.items() if attempts > 1)
    print(
        f"\n{'durable' if durable else '202 with keys'}: {len(history.done)} operations,"
        f" {sum(expected.values())} in all, every counter exact; {retried} needed a retry"
        f" (attempts: {dict(sorted(history.attempts.items()))})"
    )


async def test_plain_202s_through_sigkill_lose_at_most_what_was_unflushed(
    cluster: PgCluster, redis_url: str, tmp_path: Path
) -> None:
    """The same faults, without keys or retries: what the 202 promise allows. A distinct key
    per request (value 1), so a persisted key is exactly one increment, and a batch's ``keys``
    (logged with each flush) is exactly how many requests it holds.

    The bound comes from exact facts, no clock of two machines compared: what each killed
    replica logged as applied (the sum of ``keys`` over its applied flushes: every request it
    admitted up to the freeze of its last applied batch) must be in Postgres; whatever else it
    acknowledged is the most it may lose. A request belongs to the killed replica when nginx
    says that replica's port answered it and its answer came before the replica was started
    again (on the test's own monotonic clock)."""
    # replica, its log when it died, and when its port could first be another process's
    killed: list[tuple[ServiceProcess, str, float]] = []

    async def sigkill(replica: ServiceProcess) -> None:
        replica.signal(signal.SIGKILL)
        await asyncio.to_thread(replica.wait, 10)
        # Dead: its log is complete. The new process starts RESTART_PAUSE later at the soonest.
        killed.append((replica, replica.log(), time.monotonic() + RESTART_PAUSE))

    with topology_on(cluster, redis_url, tmp_path) as topology:
        async with Traffic(topology.url, lambda n: (f"plain-{n:07d}", 1)) as traffic:
            await with_faults(topology, cluster, lambda: len(traffic.acks), sigkill)
        topology.stop()
    assert await wait_until_no_other_backends(cluster.url) == []
    got = await persisted(cluster.url)
    attempted, acknowledged = traffic.attempted(), traffic.acknowledged()
    answered_by = topology.lb.answered_by()
    assert set(got) <= set(attempted), "nothing persisted that was never sent"
    assert all(got[key] <= attempted[key] for key in got), "nothing persisted twice"

    allowed = 0
    killed_acks: set[str] = set()
    for replica, log, restarted_at in killed:
        # Every request this replica handled (answered or cut off by the kill).
        handled = [
            sent
            for sent in traffic.sent
            if answered_by.get(sent.request_id) == replica.port and sent.answered_at < restarted_at
        ]
        acked = {sent.key for sent in handled if sent.acknowledged}
        unanswered = len(handled) - len(acked)
        applied = applied_requests(log)
        in_postgres = len({sent.key for sent in handled} & set(got))
        assert in_postgres >= applied, (
            f"{replica.env['REPLICA_ID']} logged {applied} requests applied, {in_postgres} are"
            " in Postgres"
        )
        # What it acknowledged beyond what it surely applied; the unanswered requests it may
        # have applied too (an answer cut off by the kill) widen that, exactly by their number.
        allowed += max(0, len(acked) - applied + unanswered)
        lost = len(acked - set(got))
        assert lost <= len(acked) - applied + unanswered, replica.env["REPLICA_ID"]
        killed_acks |= acked
    # What the other replicas (and the killed ones once started again) acknowledged is there.
    for key in acknowledged:
        if key not in killed_acks:
            assert got.get(key, 0) == acknowledged[key], key
    lost = sum(1 for key in acknowledged if got.get(key, 0) < acknowledged[key])
    print(
        f"\nplain 202s: {len(traffic.acks)} acknowledged of {len(traffic.sent)} sent;"
        f" {lost} acknowledged increments lost, at most {allowed} allowed (acknowledged by the"
        f" {len(killed)} killed replicas beyond what they logged applied); statuses"
        f" {dict(traffic.statuses())}"
    )
