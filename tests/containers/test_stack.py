"""docker-compose.yml run by Docker: three replicas behind the nginx container, Postgres, Redis
and Prometheus in containers, every request through the load balancer's published port.

Outcomes are counted as in tests/test_topology.py (the same topology without Docker): a 202 is
acknowledged, a 4xx or the service's 503 counted nothing, a 502 from nginx or no answer is an
unknown outcome; persisted must be the acknowledged total plus a subset of the unknown ones.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

import asyncpg
import pytest

from tests.containers.conftest import COMPOSE_VARIABLES
from tests.containers.docker import ComposeStack, container_ip, docker, inspect
from tests.support.api import counter_via_api, signed_in
from tests.support.compose import REPO_ROOT
from tests.support.load import (
    PROMISE_SECONDS,
    Traffic,
    lb_statuses,
    unexplained,
    wait_until_explained,
)
from tests.support.logs import json_log_lines
from tests.support.net import http_get
from tests.support.polling import eventually
from tests.support.postgres import persisted

pytestmark = pytest.mark.timeout(300)

REPLICAS = 3
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
FLUSH_INTERVAL = float(COMPOSE_VARIABLES["FLUSH_INTERVAL_SECONDS"])


def nginx_resolver_valid_seconds() -> int:
    """How long nginx keeps the addresses of `app` (`resolver ... valid=5s`)."""
    found = re.search(r"resolver [^;]*valid=(\d+)s", NGINX_CONF.read_text())
    assert found, f"no resolver valid= in {NGINX_CONF}"
    return int(found[1])


@pytest.fixture
async def restored(stack: ComposeStack) -> ComposeStack:
    """The stack with three healthy replicas and no counters, whatever the last test did."""
    before = set(replica_ips(stack).values())
    await asyncio.to_thread(stack.up, "--scale", f"app={REPLICAS}")
    if before - set(replica_ips(stack).values()):
        # Replicas were removed (scaled down): nginx keeps sending to their addresses until it
        # resolves `app` again, and a request that meets two of them is answered 502.
        await asyncio.sleep(nginx_resolver_valid_seconds() + 1)
    await _truncate(stack.database_url)
    return stack


async def _truncate(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE counters")
    finally:
        await conn.close()


def replica_ips(stack: ComposeStack, network: str = "proxy") -> dict[str, str]:
    """container id -> address on a compose network (``proxy``, nginx's, by default), for
    every running `app` replica."""
    return {c: container_ip(c, network) for c in stack.containers("app")}


def answered_by(stack: ComposeStack, traffic: Traffic) -> Counter[str]:
    """How many of this traffic's requests each replica (by address) answered."""
    answered = stack.lb_answered_by()
    return Counter(answered[s.request_id] for s in traffic.sent if s.request_id in answered)


def nginx_workers(container: str) -> set[str]:
    """Pids of the nginx worker processes in the container."""
    top = docker("top", container, "-o", "pid,args").stdout.splitlines()[1:]
    workers = {line.split()[0] for line in top if "worker process" in line}
    assert workers, top
    return workers


def scrape_targets(stack: ComposeStack) -> dict[str, str]:
    """Prometheus's targets of the job `increment-service`: instance address -> health."""
    status, body = http_get(stack.prometheus_url + "/api/v1/targets?state=active")
    assert status == 200, body
    targets = json.loads(body)["data"]["activeTargets"]
    return {
        t["labels"]["instance"].rsplit(":", 1)[0]: t["health"]
        for t in targets
        if t["labels"]["job"] == "increment-service"
    }


async def test_sustained_load_through_nginx_is_persisted_exactly(restored: ComposeStack) -> None:
    stack = restored
    ips = set(replica_ips(stack).values())
    started = time.monotonic()
    async with Traffic(stack.lb_url, lambda n: (f"load-{n % 1000:03d}", 1 + n % 7)) as traffic:
        await traffic.wait_for_acks(2000, within=60)
        await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - started)))
    got, caught_up = await wait_until_explained(stack.database_url, traffic)

    assert traffic.statuses() == Counter({202: len(traffic.sent)}), lb_statuses(traffic)
    assert got == dict(traffic.acknowledged())
    assert caught_up <= PROMISE_SECONDS
    spread = answered_by(stack, traffic)
    assert set(spread) == ips, spread
    assert spread.total() == len(traffic.sent)
    print(
        f"\ncompose, sustained load: {len(traffic.sent)} increments in "
        f"{traffic.sent[-1].answered_at - traffic.sent[0].sent_at:.1f}s over {len(ips)} "
        f"replicas {sorted(spread.values())}, persisted exactly {caught_up:.2f}s after"
    )


async def test_prometheus_scrapes_every_replica(restored: ComposeStack) -> None:
    stack = restored
    ips = set(replica_ips(stack, "default").values())  # where Prometheus scrapes them
    async with Traffic(stack.lb_url, lambda n: (f"prom-{n % 10}", 1)) as traffic:
        await traffic.wait_for_acks(300, within=30)

    def every_replica_up() -> bool:
        return scrape_targets(stack) == dict.fromkeys(ips, "up")

    await eventually(every_replica_up, "Prometheus scrapes every replica", 40)

    def counted_by_prometheus() -> float:
        query = "sum(increments_total)"
        status, body = http_get(f"{stack.prometheus_url}/api/v1/query?query={query}")
        assert status == 200, body
        result = json.loads(body)["data"]["result"]
        return float(result[0]["value"][1]) if result else -1.0

    # The replicas' own count of 202s, summed by Prometheus, reaches what the traffic saw.
    await eventually(
        lambda: counted_by_prometheus() >= len(traffic.acks),
        "Prometheus's sum of increments_total reaches the acknowledged count",
        30,
    )


async def test_docker_stop_of_a_replica_mid_load_loses_nothing_acknowledged(
    restored: ComposeStack,
) -> None:
    stack = restored
    victim = stack.containers("app")[1]
    async with Traffic(stack.lb_url, lambda n: (f"stop-{n % 500:03d}", 1 + n % 5)) as traffic:
        await traffic.wait_for_acks(1000, within=30)
        sent = time.monotonic()
        await asyncio.to_thread(docker, "stop", victim)
        took = time.monotonic() - sent
        await traffic.wait_for_acks(len(traffic.acks) + 1000, within=30)
    got, caught_up = await wait_until_explained(stack.database_url, traffic)

    state = inspect(victim)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state
    assert took < 15, f"docker stop took {took:.1f}s"
    shutdown = [e for e in json_log_lines(docker("logs", victim).stdout) if e.get("event")]
    assert "shutdown: everything acknowledged is persisted" in [e["msg"] for e in shutdown]
    assert set(traffic.statuses()) <= {202, 502}, lb_statuses(traffic)
    assert unexplained(got, traffic) == {}
    assert caught_up <= PROMISE_SECONDS
    print(
        f"\ncompose, docker stop of a replica under load: stopped in {took:.1f}s (exit 0), "
        f"statuses {lb_statuses(traffic)}, persisted exactly {caught_up:.2f}s after the load"
    )


async def test_docker_kill_of_a_replica_never_over_counts_and_the_others_lose_nothing(
    restored: ComposeStack,
) -> None:
    stack = restored
    victim = stack.containers("app")[2]
    victim_ip = container_ip(victim, "proxy")
    # A distinct key per request, value 1: a persisted key is exactly one increment.
    async with Traffic(stack.lb_url, lambda n: (f"kill-{n:07d}", 1)) as traffic:
        await traffic.wait_for_acks(1500, within=30)
        await asyncio.to_thread(docker, "kill", victim)
        killed_at = time.monotonic()  # the container is dead once `docker kill` returns
        await traffic.wait_for_acks(len(traffic.acks) + 1000, within=30)
    assert inspect(victim)["State"]["ExitCode"] == 137

    answered = stack.lb_answered_by()
    acked = [s for s in traffic.sent if s.acknowledged]
    assert all(s.request_id in answered for s in acked), "nginx logged every answer"
    by_survivors = {s.key for s in acked if answered[s.request_id] != victim_ip}
    attempted = traffic.attempted()

    def survivors_flushed() -> bool:
        return by_survivors <= set(asyncio.run(persisted(stack.database_url)))

    await eventually(survivors_flushed, "the survivors' increments are persisted", 15)
    got = await persisted(stack.database_url)
    # Never over-counted: nothing persisted that was not sent, nothing twice.
    assert all(value <= attempted[key] for key, value in got.items())
    lost = [s for s in acked if s.key not in got]
    assert all(answered[s.request_id] == victim_ip for s in lost)
    # What it lost is what it acknowledged since its last flush: one interval, plus a flush in
    # progress and the time `docker kill` takes.
    oldest_lost = max((killed_at - s.answered_at for s in lost), default=0.0)
    assert oldest_lost <= FLUSH_INTERVAL + 1.0, oldest_lost
    assert set(traffic.statuses()) <= {202, 502}, lb_statuses(traffic)
    print(
        f"\ncompose, docker kill of a replica under load: {len(acked)} acknowledged, "
        f"{len(lost)} lost, all acknowledged by the killed replica, the oldest "
        f"{oldest_lost:.2f}s before the kill; statuses {lb_statuses(traffic)}"
    )


async def test_scaling_to_five_replicas_gets_them_traffic_without_a_reload(
    restored: ComposeStack,
) -> None:
    stack = restored
    (lb,) = stack.containers("lb")
    lb_started, lb_workers = inspect(lb)["State"]["StartedAt"], nginx_workers(lb)
    await asyncio.to_thread(stack.up, "--scale", "app=5")
    ips = set(replica_ips(stack).values())
    assert len(ips) == 5

    async with Traffic(stack.lb_url, lambda n: (f"scale-{n % 200:03d}", 1)) as traffic:
        await traffic.wait_for_acks(500, within=30)
        # nginx re-resolves `app` every 5 s (resolver valid=5s).
        await eventually(
            lambda: set(answered_by(stack, traffic)) == ips,
            "nginx sends traffic to all five replicas",
            30,
        )
    got, _ = await wait_until_explained(stack.database_url, traffic)
    assert traffic.statuses() == Counter({202: len(traffic.sent)}), lb_statuses(traffic)
    assert got == dict(traffic.acknowledged())
    assert inspect(lb)["State"]["StartedAt"] == lb_started, "the load balancer was restarted"
    assert nginx_workers(lb) == lb_workers, "nginx was reloaded (a reload replaces the workers)"
    scraped = set(replica_ips(stack, "default").values())
    await eventually(
        lambda: scrape_targets(stack) == dict.fromkeys(scraped, "up"),
        "Prometheus scrapes all five",
        40,
    )


async def test_postgres_restart_mid_load_is_exact(restored: ComposeStack) -> None:
    stack = restored
    async with Traffic(stack.lb_url, lambda n: (f"pg-{n % 300:03d}", 1 + n % 5)) as traffic:
        await traffic.wait_for_acks(1000, within=30)
        await asyncio.to_thread(stack.compose, "restart", "postgres")
        await traffic.wait_for_acks(len(traffic.acks) + 1000, within=30)
    got, caught_up = await wait_until_explained(stack.database_url, traffic, within=30)

    statuses = traffic.statuses()
    # No 5xx but the service's documented backpressure answer (503 with Retry-After).
    assert set(statuses) <= {202, 503}, lb_statuses(traffic)
    assert traffic.unknown() == []
    assert got == dict(traffic.acknowledged())
    postgres_log = stack.logs("postgres")
    assert "received fast shutdown request" in postgres_log
    print(
        f"\ncompose, Postgres restarted under load: statuses {lb_statuses(traffic)}, "
        f"persisted exactly {caught_up:.2f}s after the load"
    )


async def test_down_then_up_keeps_counters_and_sessions(restored: ComposeStack) -> None:
    stack = restored
    cookie = await signed_in(stack.lb_url)
    async with Traffic(stack.lb_url, lambda n: (f"kept-{n % 50:02d}", 1 + n % 3)) as traffic:
        await traffic.wait_for_acks(500, within=30)
    before, _ = await wait_until_explained(stack.database_url, traffic)
    assert before == dict(traffic.acknowledged())

    await asyncio.to_thread(stack.down)  # containers and network go, volumes stay
    assert stack.containers("app") == []
    await asyncio.to_thread(stack.up)

    assert await persisted(stack.database_url) == before
    # The session lives in Redis only: it survived in Redis's volume (append-only file).
    assert await counter_via_api(stack.lb_url, "kept-00", cookie) == before["kept-00"]
