"""Exactly once, end to end: a checker in the spirit of Jepsen's counter test.

Three replicas behind nginx (the native topology, compose's settings), a Postgres cluster of
the test's own, and clients that use the shipped ``increment_service.client``. Meanwhile
replicas are stopped or killed and started again, Postgres hangs once (every process of the
cluster stopped with SIGSTOP for longer than a statement's timeout) and is restarted once.

The operations, each under an Idempotency-Key and retried with it by the client:

- single increments on shared counters (most of the traffic);
- batches crossing the bigint edge: counters seeded near 2**63-1 (a private one per batch,
  and shared ones) and near -2**63, items that would leave bigint beside items that fit;
- keys reused across bodies (a client's bug, on purpose): two bodies under one key, one after
  the other or at once, then the first one again (its real retry);
- replays of an operation that succeeded, with its key and body, durable or not.

At the end, for every operation, what it was told (or the exception it got) is compared with
Postgres: a key's record holds the one body applied under it and the items it did not apply,
so a ``204``/``200`` must name exactly what was applied, ``IncrementRejected`` and
``IdempotencyKeyReused`` mean this body was not applied, ``IncrementFailed`` may be either;
and every counter must equal its seed plus exactly the applied items of the recorded bodies.

Plain ``202``s (no key, no retry; a counter each) run beside them: one may be lost only if a
replica that may have answered it was SIGKILLed, and only with what that replica had not
flushed (tests/support/checker.py says how that is decided from the order of events).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from increment_service.client import IncrementClient, IncrementFailed
from tests.support.checker import (
    FITS_PRIVATE,
    MAX_SAFE,
    PRIVATE_EDGE,
    SHARED_HIGH,
    SHARED_LOW,
    Body,
    Item,
    Lifetimes,
    Op,
    judge_operations,
    judge_plain,
    read_records,
    seed_counters,
)
from tests.support.hang import hang_postgres
from tests.support.load import Traffic
from tests.support.nginx import nginx_binary
from tests.support.polling import eventually
from tests.support.postgres import PgCluster, persisted, wait_until_no_other_backends
from tests.support.processes import ServiceProcess
from tests.support.topology import NativeTopology

pytestmark = [
    pytest.mark.timeout(300),
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
#: Postgres hung this long: past a flush's statement timeout (5 s) and a durable request's
#: DURABLE_TIMEOUT_SECONDS.
HANG_SECONDS = 6.0
CLIENTS = 16
COUNTERS = 20
#: Per operation, the client's total deadline: generous; past it the client raises
#: IncrementFailed (outcome unknown), which the checker bounds like any other answer.
DEADLINE_SECONDS = 60.0

#: Seeded counters: private edge counters (one per edge batch, while they last), shared ones
#: near the top of bigint and one near the bottom.
PRIVATE_EDGES = [f"x-{n:04d}" for n in range(1500)]
HIGH_EDGES = [f"edge-high-{n}" for n in range(3)]
LOW_EDGE = "edge-low"
SEEDS = (
    dict.fromkeys(PRIVATE_EDGES, PRIVATE_EDGE)
    | dict.fromkeys(HIGH_EDGES, SHARED_HIGH)
    | {LOW_EDGE: SHARED_LOW}
)
#: Shares of the operations (the rest: single increments).
EDGE_SHARE, REUSE_SHARE, REPLAY_SHARE = 0.05, 0.03, 0.03


class History:
    """Every operation the clients sent, with what it was told."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.finished = 0
        self.succeeded = 0
        self._n = 0
        self._private = iter(PRIVATE_EDGES)

    def key(self, tag: str) -> str:
        self._n += 1
        return f"{tag}-{self._n:06d}"

    def private_edge(self) -> str | None:
        return next(self._private, None)

    async def run(self, client: IncrementClient, *ops: Op) -> None:
        """Send ``ops`` at once and record them."""
        self.ops.extend(ops)
        await asyncio.gather(*(op.send(client) for op in ops))
        self.finished += len(ops)
        self.succeeded += sum(op.succeeded for op in ops)

    def outcomes(self) -> dict[str, Counter[str]]:
        """Per kind of operation, how many got each answer or exception."""
        table: dict[str, Counter[str]] = {}
        for op in self.ops:
            table.setdefault(op.label, Counter())[op.outcome()] += 1
        return table


def edge_body(rng: random.Random, own: str, private: str | None) -> Body:
    """A batch crossing the bigint edge: an item on a counter of its own (fits), one on a
    private edge counter if any is left, one on a shared high edge counter, sometimes one on
    the low edge and one on a shared counter; each edge item overflowing or not at random.
    Distinct counters, so each item's fate is its own."""
    items: list[tuple[Item, bool]] = [((own, rng.randint(1, 5)), False)]
    if private is not None:
        over = rng.random() < 0.5
        items.append(((private, MAX_SAFE if over else FITS_PRIVATE), over))
    over = rng.random() < 0.4
    items.append(((rng.choice(HIGH_EDGES), MAX_SAFE if over else -rng.randint(1, 3)), over))
    if rng.random() < 0.5:
        over = rng.random() < 0.3
        items.append(((LOW_EDGE, -MAX_SAFE if over else rng.randint(1, 3)), over))
    if rng.random() < 0.5:
        items.append(((f"c{rng.randrange(COUNTERS):02d}", rng.randint(1, 5)), False))
    rng.shuffle(items)
    return Body(
        "batch",
        tuple(item for item, _ in items),
        tuple(n for n, (_, over) in enumerate(items) if over),
    )


async def run_clients(url: str, durable: bool, stop: asyncio.Event, history: History) -> None:
    async def one(n: int) -> None:
        rng = random.Random(n)
        mine: list[Op] = []  # this client's operations that succeeded: to replay
        async with IncrementClient(url, deadline=DEADLINE_SECONDS, rng=rng) as client:
            while not stop.is_set():
                roll = rng.random()
                if roll < EDGE_SHARE:
                    key = history.key("edge")
                    body = edge_body(rng, f"o-{key}", history.private_edge())
                    op = Op("edge", body, key, durable)
                    await history.run(client, op)
                elif roll < EDGE_SHARE + REUSE_SHARE:
                    await reuse_a_key(client, rng, durable, history)
                    continue
                elif roll < EDGE_SHARE + REUSE_SHARE + REPLAY_SHARE and mine:
                    first = rng.choice(mine)
                    # Durable or not: a plain retry of a durable answer is told it too, and
                    # a durable retry of a 202 is told what its commit applied.
                    again = Op("replay", first.body, first.idempotency_key, rng.random() < 0.5)
                    await history.run(client, again)
                    continue
                else:
                    body = Body("single", ((f"c{rng.randrange(COUNTERS):02d}", rng.randint(1, 5)),))
                    op = Op("single", body, history.key("op"), durable)
                    await history.run(client, op)
                if op.succeeded:
                    mine.append(op)

    await asyncio.gather(*(one(n) for n in range(CLIENTS)))


async def reuse_a_key(
    client: IncrementClient, rng: random.Random, durable: bool, history: History
) -> None:
    """Two bodies under one key (a single increment, then a batch of another route kind),
    one after the other or at once, then the first body again under it: its real retry."""
    key = history.key("reuse")
    first = Body("single", ((f"ra-{key}", 1),))
    other = Body("batch", ((f"rb-{key}", 2), (f"c{rng.randrange(COUNTERS):02d}", 1)))
    a = Op("reuse", first, key, durable, shared_key=True)
    b = Op("reuse", other, key, durable, shared_key=True)
    if rng.random() < 0.5:
        await history.run(client, a, b)
    else:
        await history.run(client, a)
        await history.run(client, b)
    await history.run(client, Op("reuse", first, key, durable, shared_key=True))


async def probe_hung(topology: NativeTopology, history: History) -> list[int]:
    """A durable increment sent straight to each replica, once (no retry), while Postgres is
    hung: each must be answered 503 (nothing can commit). Recorded as operations whose outcome
    is unknown: a replica retries a group it sent until its outcome is known."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(replica: ServiceProcess) -> int:
            key = history.key("probe")
            op = Op("hang-probe", Body("single", ((f"probe-{key}", 1),)), key, durable=True)
            headers = {"Idempotency-Key": key, "Prefer": "durable"}
            body = {"key": f"probe-{key}", "value": 1}
            async with session.post(
                replica.url + "/increment", json=body, headers=headers
            ) as response:
                await response.read()
                status = response.status
            op.told = IncrementFailed(f"{status} while Postgres hung", key, 1, status=status)
            history.ops.append(op)
            return status

        return list(await asyncio.gather(*(one(r) for r in topology.replicas)))


async def restart_postgres(cluster: PgCluster, down_for: float = 2.0) -> None:
    await asyncio.to_thread(cluster.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(cluster.start)


Fault = Callable[[ServiceProcess], Awaitable[None]]


def faults(lifetimes: Lifetimes) -> tuple[Fault, Fault]:
    """SIGTERM and SIGKILL of a replica, each recorded in ``lifetimes``."""

    async def sigterm(replica: ServiceProcess) -> None:
        signalled_at = time.monotonic()
        replica.signal(signal.SIGTERM)
        assert await asyncio.to_thread(replica.wait, 20) == 0
        lifetimes.ended(replica.port, signalled_at, time.monotonic(), killed=False)

    async def sigkill(replica: ServiceProcess) -> None:
        signalled_at = time.monotonic()
        replica.signal(signal.SIGKILL)
        await asyncio.to_thread(replica.wait, 10)
        lifetimes.ended(replica.port, signalled_at, time.monotonic(), killed=True)

    return sigterm, sigkill


def final_stop(topology: NativeTopology, lifetimes: Lifetimes) -> None:
    """The load balancer, then every replica (SIGTERM: the final flushes), recorded."""
    topology.lb.stop()
    for replica in topology.replicas:
        signalled_at = time.monotonic()
        assert replica.stop() == 0
        lifetimes.ended(replica.port, signalled_at, time.monotonic(), killed=False)


async def with_faults(
    topology: NativeTopology,
    cluster: PgCluster,
    done: Callable[[], int],
    fault: Fault,
    more: int,
    history: History | None = None,
) -> list[int]:
    """The schedule: each replica in turn gets ``fault`` and is started again, with progress
    between the faults (``more`` operations done, by ``done()``); Postgres hangs after the
    first and is restarted after the second. With a ``history``, each replica is sent a durable
    increment while Postgres hangs: returns their statuses."""

    async def step() -> None:
        # Some seconds of traffic between faults (several flushes), and some progress.
        await asyncio.sleep(STEP_SECONDS)
        start = done()

        async def moved() -> bool:
            return done() >= start + more

        await eventually(moved, f"{more} more operations done", within=60)

    await step()
    seen_hung: list[int] = []
    for n, replica in enumerate(topology.replicas):
        await fault(replica)
        await asyncio.sleep(RESTART_PAUSE)
        await asyncio.to_thread(topology.start_replica, replica)
        await step()
        if n == 0:
            probes = probe_hung(topology, history) if history else asyncio.sleep(0, [])
            seen_hung = await hang_postgres(cluster, HANG_SECONDS, probes)
            await step()
        if n == 1:
            await restart_postgres(cluster)
            await step()
    return seen_hung


def topology_on(cluster: PgCluster, redis_url: str, tmp_path: Path) -> NativeTopology:
    return NativeTopology(
        tmp_path, database_url=cluster.url, redis_url=redis_url, variables=VARIABLES
    )


def plain_traffic(url: str) -> Traffic:
    """Plain increments, no key, a counter of its own each (value 1): a persisted counter is
    exactly one increment applied."""
    return Traffic(url, lambda n: (f"plain-{n:07d}", 1), concurrency=2, prefix="plain")


@pytest.mark.parametrize("durable", [False, True], ids=["202-with-keys", "durable"])
async def test_every_answer_is_true_and_every_counter_exact(
    cluster: PgCluster, redis_url: str, tmp_path: Path, durable: bool
) -> None:
    """Keyed operations (written behind, or durable) through SIGTERM restarts (written behind:
    a replica flushes what it acknowledged before it exits) or SIGKILL (durable: acknowledged
    means committed), a Postgres hang and a Postgres restart: every answer agrees with
    Postgres, every counter is exact, and plain 202s lose at most what a SIGKILLed replica
    had not flushed."""
    await seed_counters(cluster.url, SEEDS)
    history = History()
    lifetimes = Lifetimes()
    sigterm, sigkill = faults(lifetimes)
    stop = asyncio.Event()
    started = time.monotonic()
    with topology_on(cluster, redis_url, tmp_path) as topology:
        async with plain_traffic(topology.url) as plain:
            clients = asyncio.ensure_future(run_clients(topology.url, durable, stop, history))
            try:
                seen_hung = await with_faults(
                    topology,
                    cluster,
                    lambda: history.succeeded,
                    sigkill if durable else sigterm,
                    150,
                    history,
                )
            finally:
                stop.set()
                await clients
        final_stop(topology, lifetimes)
        answered_by = topology.lb.answered_by()
    took = time.monotonic() - started
    assert await wait_until_no_other_backends(cluster.url) == []
    got = await persisted(cluster.url)
    records, twice = await read_records(cluster.url)
    assert twice == [], f"keys recorded twice: {twice[:5]}"
    problems, _ = judge_operations(history.ops, records, got, SEEDS)
    plain_problems, lost, may_be_lost = judge_plain(plain.sent, got, answered_by, lifetimes)
    assert problems + plain_problems == [], "\n".join((problems + plain_problems)[:40])
    assert seen_hung == [503] * len(topology.replicas), f"durable while Postgres hung: {seen_hung}"
    outcomes = {label: dict(c) for label, c in sorted(history.outcomes().items())}
    retried = sum(1 for op in history.ops if getattr(op.told, "attempts", 1) > 1)
    print(
        f"\n{'durable' if durable else '202 with keys'}: {len(history.ops)} operations in"
        f" {took:.0f} s, every answer true and every counter exact; {retried} needed a retry;"
        f" durable probes while Postgres hung: {seen_hung}; outcomes {outcomes};"
        f" plain 202s: {len(plain.acks)} acknowledged, {lost} lost, at most {may_be_lost}"
        " acknowledged by SIGKILLed replicas"
    )


async def test_plain_202s_through_sigkill_lose_at_most_what_was_unflushed(
    cluster: PgCluster, redis_url: str, tmp_path: Path
) -> None:
    """The same faults, without keys or retries: what the 202 promise allows. A distinct key
    per request (value 1), so a persisted key is exactly one increment."""
    lifetimes = Lifetimes()
    _, sigkill = faults(lifetimes)
    with topology_on(cluster, redis_url, tmp_path) as topology:
        async with Traffic(topology.url, lambda n: (f"plain-{n:07d}", 1)) as traffic:
            await with_faults(topology, cluster, lambda: len(traffic.acks), sigkill, 300)
        final_stop(topology, lifetimes)
        answered_by = topology.lb.answered_by()
    assert await wait_until_no_other_backends(cluster.url) == []
    got = await persisted(cluster.url)
    problems, lost, may_be_lost = judge_plain(traffic.sent, got, answered_by, lifetimes)
    assert problems == [], "\n".join(problems[:40])
    print(
        f"\nplain 202s: {len(traffic.acks)} acknowledged of {len(traffic.sent)} sent;"
        f" {lost} acknowledged increments lost, none acknowledged after a lost one by the same"
        f" process persisted, at most {may_be_lost} allowed (acknowledged by the killed"
        f" replicas); statuses {dict(traffic.statuses())}"
    )
