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
from tests.support.logs import last_applied_freeze
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
    per request (value 1), so a persisted key is exactly one increment."""
    killed: list[tuple[ServiceProcess, float, float]] = []  # replica, wall and monotonic time

    async def sigkill(replica: ServiceProcess) -> None:
        killed.append((replica, time.time(), time.monotonic()))
        replica.signal(signal.SIGKILL)
        await asyncio.to_thread(replica.wait, 10)

    with topology_on(cluster, redis_url, tmp_path) as topology:
        async with Traffic(topology.url, lambda n: (f"plain-{n:07d}", 1)) as traffic:
            await with_faults(topology, cluster, lambda: len(traffic.acks), sigkill)
        topology.stop()
    assert await wait_until_no_other_backends(cluster.url) == []
    got = await persisted(cluster.url)
    attempted, acknowledged = traffic.attempted(), traffic.acknowledged()
    answered_by = topology.lb.answered_by()
    # What each killed replica acknowledged after the freeze of its last batch applied
    # before the kill: the most it may have lost (0.1 s of slack for log timestamps).
    unflushed: Counter[str] = Counter()
    for replica, killed_wall, killed_at in killed:
        frozen = last_applied_freeze(replica.log(), killed_wall)
        last_freeze = 0.0 if frozen is None else frozen
        for sent in traffic.acks:
            answered_wall = killed_wall - (killed_at - sent.answered_at)
            if (
                answered_by.get(sent.request_id) == replica.port
                # Answers still on their way at the kill arrive just after it; the replica
                # on that port again is started RESTART_PAUSE later.
                and last_freeze - 0.1 <= answered_wall <= killed_wall + RESTART_PAUSE
            ):
                unflushed[sent.key] += sent.value
    assert set(got) <= set(attempted), "nothing persisted that was never sent"
    for key in set(attempted) | set(got):
        assert acknowledged[key] - unflushed[key] <= got.get(key, 0) <= attempted[key], key
    lost = sum(1 for key in acknowledged if got.get(key, 0) < acknowledged[key])
    print(
        f"\nplain 202s: {len(traffic.acks)} acknowledged of {len(traffic.sent)} sent;"
        f" {lost} acknowledged increments lost, at most {unflushed.total()} allowed (acknowledged"
        f" by the {len(killed)} killed replicas after their last flush); statuses"
        f" {dict(traffic.statuses())}"
    )
