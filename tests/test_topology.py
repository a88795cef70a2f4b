"""The native multi-replica topology: compose's stack without Docker, driven through nginx.

Three `increment-service` processes (compose's `app`, with its environment) with distinct
REPLICA_IDs, nginx with deploy/nginx/native.conf.template in front on a free loopback port, one
Postgres and one Redis. Every request goes through the load balancer; every fault is real
(SIGTERM, SIGKILL, a Postgres cluster stopped and started).

How outcomes are counted: a 202 is acknowledged; a 4xx or the service's 503 is a definite
"not counted"; anything else (a 502/504 made by nginx, no answer at all) is attempted with an
unknown outcome. nginx retries a POST on the next replica only when the request was never sent
(connection refused, connect timeout): `proxy_next_upstream error timeout` without
`non_idempotent`. A POST already written to a replica that then dies, or to a kept-alive
connection the replica is closing, is answered 502 and not retried, so it cannot be counted
twice. The exactness checks below therefore allow, per key, exactly the acknowledged total plus
any subset of that key's unknown-outcome increments, and nothing else.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from increment_service.settings import Settings
from tests.support.compose import compose_app_environment, compose_app_replicas, compose_file
from tests.support.load import (
    PROMISE_SECONDS,
    Traffic,
    lb_statuses,
    unexplained,
    wait_until_explained,
)
from tests.support.logs import (
    applied_flushes,
    applied_requests,
    json_log_lines,
    last_applied_freeze,
    log_wall,
)
from tests.support.metrics import scrape_metric
from tests.support.net import http_get, wait_until_healthy
from tests.support.nginx import nginx_binary
from tests.support.polling import eventually
from tests.support.postgres import PgCluster, persisted, wait_until_no_other_backends
from tests.support.processes import ServiceProcess
from tests.support.topology import NATIVE_OUT_OF_SCOPE, NATIVE_OVERRIDES, NativeTopology

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(nginx_binary() is None, reason="nginx (Debian package nginx) is needed"),
]

FLUSH_INTERVAL = 1.0
#: What a compose user would put in `.env` for the same tuning: these go through compose's own
#: `${VAR:-default}` interpolation of the `app` environment.
COMPOSE_VARIABLES = {"FLUSH_INTERVAL_SECONDS": f"{FLUSH_INTERVAL:g}", "WORKERS": "1"}


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def topology(
    clean: None, database_url: str, redis_url: str, tmp_path: Path
) -> Iterator[NativeTopology]:
    with NativeTopology(
        tmp_path, database_url=database_url, redis_url=redis_url, variables=COMPOSE_VARIABLES
    ) as running:
        yield running


def replica_events(replica: ServiceProcess, event: str) -> list[dict[str, object]]:
    return [e for e in json_log_lines(replica.log()) if e.get("event") == event]


async def incarnations(database_url: str) -> Counter[str]:
    """REPLICA_ID -> how many process starts of it applied batches (the ids in
    applied_batches are `REPLICA_ID:<random suffix per start>`)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT DISTINCT replica_id FROM applied_batches")
    finally:
        await conn.close()
    return Counter(r["replica_id"].rsplit(":", 1)[0] for r in rows)


def lb_retries(topology: NativeTopology) -> tuple[int, int]:
    """From nginx's access log: (requests nginx passed to a second replica after the first
    failed, 502s that went to more than one replica). nginx may retry a POST only when it
    never reached a replica, so the second number must be 0."""
    retried = bad = 0
    for entry in topology.lb.access_log():
        tries = str(entry.get("upstream_addr", "")).count(", ") + 1
        if tries > 1:
            retried += 1
            bad += entry.get("status") == 502
    return retried, bad


def took_traffic(replica: ServiceProcess) -> bool:
    return (scrape_metric(replica.url, "increments_total") or 0) > 0


# --- the topology is compose's -------------------------------------------------------------


def test_native_topology_has_compose_roles_and_settings(tmp_path: Path) -> None:
    """Fails when docker-compose.yml and the native topology drift apart."""
    compose = compose_file()
    topology = NativeTopology(
        tmp_path,
        database_url="postgresql://postgres@127.0.0.1:5432/native",
        redis_url="redis://127.0.0.1:6379/0",
        variables=COMPOSE_VARIABLES,
    )

    # Same roles: every compose service but the monitoring ones, as many replicas of app.
    roles = topology.roles()
    assert set(compose["services"]) - NATIVE_OUT_OF_SCOPE == set(roles)
    assert set(compose["services"]) >= NATIVE_OUT_OF_SCOPE, "update NATIVE_OUT_OF_SCOPE"
    assert roles["app"] == compose_app_replicas() >= 3
    assert roles["lb"] == 1
    assert "nginx" in compose["services"]["lb"]["image"]
    assert any("deploy/nginx/nginx.conf" in v for v in compose["services"]["lb"]["volumes"])
    ports = [r.port for r in topology.replicas]
    upstreams = [
        line.split()[1]
        for line in topology.lb.config.splitlines()
        if line.strip().startswith("server 127.0.0.1:")
    ]
    assert upstreams == [f"127.0.0.1:{p}" for p in ports]
    assert f"listen 127.0.0.1:{topology.lb.port};" in topology.lb.config

    # Same settings: compose's app environment, key for key; only NATIVE_OVERRIDES differ.
    compose_env = compose_app_environment(COMPOSE_VARIABLES)
    defaults = compose_app_environment()
    assert compose_env["FLUSH_INTERVAL_SECONDS"] == "1", "FLUSH_INTERVAL_SECONDS not a variable"
    assert compose_env["WORKERS"] == "1"
    assert {k for k in compose_env if compose_env[k] != defaults[k]} <= set(COMPOSE_VARIABLES)
    assert "REPLICA_ID" not in compose_env, "compose sets REPLICA_ID now: update the topology"
    compose_hosts = set(compose["services"])
    for replica_id, env, process in zip(
        topology.replica_ids, topology.environments, topology.replicas, strict=True
    ):
        assert set(env) == set(compose_env) | {"REPLICA_ID"}
        assert env["REPLICA_ID"] == replica_id
        kept = {k: v for k, v in env.items() if k not in NATIVE_OVERRIDES}
        assert kept == {k: v for k, v in compose_env.items() if k not in NATIVE_OVERRIDES}
        for name in NATIVE_OVERRIDES - {"REPLICA_ID"}:
            assert env[name] != compose_env[name], f"{name} needs no override: drop it"
        # Nothing passed on verbatim names a host or path that exists only in compose.
        for name, value in kept.items():
            assert "/var/lib" not in value, (name, value)
            assert not any(f"{host}:" in value or f"//{host}" in value for host in compose_hosts)
        # What the process really gets: ServiceProcess's own defaults do not win.
        assert {k: process.env[k] for k in env} == env
        settings = Settings.from_env(env)
        assert settings.flush_interval_seconds == FLUSH_INTERVAL
        assert settings.workers == 1
        assert (settings.host, settings.port) == ("127.0.0.1", process.port)
    assert len(set(topology.replica_ids)) == len(topology.replicas)
    assert len(set(ports)) == len(ports)
    # compose waits for `service_healthy` (GET /api/health); so does the native start.
    assert "/api/health" in " ".join(compose["services"]["app"]["healthcheck"]["test"])


# --- 1. Sustained load ---------------------------------------------------------------------


async def test_sustained_load_through_the_lb_persists_what_was_acknowledged(
    topology: NativeTopology, database_url: str
) -> None:
    started = time.monotonic()
    async with Traffic(topology.url, lambda n: (f"load-{n % 2000:04d}", 1 + n % 7)) as traffic:
        await traffic.wait_for_acks(2000)
        await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - started)))
    got, caught_up = await wait_until_explained(database_url, traffic)

    sent = traffic.sent
    acknowledged = traffic.acknowledged()
    assert traffic.statuses() == Counter({202: len(sent)}), lb_statuses(traffic)
    assert acknowledged == traffic.attempted()
    assert got == dict(acknowledged)
    assert caught_up <= PROMISE_SECONDS
    # Every replica took its share, and the three counted exactly the acknowledged requests.
    counted = [scrape_metric(r.url, "increments_total") or 0 for r in topology.replicas]
    assert all(c > 0 for c in counted), counted
    assert sum(counted) == len(sent)
    by_port = Counter(topology.lb.answered_by().values())
    assert set(by_port) == {r.port for r in topology.replicas}
    assert await incarnations(database_url) == Counter(dict.fromkeys(topology.replica_ids, 1))
    print(
        f"\nsustained load: {len(sent)} increments over {len(acknowledged)} keys in "
        f"{sent[-1].answered_at - sent[0].sent_at:.1f}s, per replica {counted}; persisted "
        f"exactly {caught_up:.2f}s after the load stopped"
    )


# --- 2. One replica SIGTERMed and restarted under load -------------------------------------


async def test_replica_sigterm_and_restart_under_load_is_exact(
    topology: NativeTopology, database_url: str
) -> None:
    victim = topology.replicas[1]
    budget = float(topology.environments[1]["SHUTDOWN_TIMEOUT_SECONDS"])
    async with Traffic(topology.url, lambda n: (f"term-{n % 500:03d}", 1 + n % 5)) as traffic:
        await traffic.wait_for_acks(1500)
        await eventually(lambda: took_traffic(victim), "the victim took traffic", within=10)
        victim.signal(signal.SIGTERM)
        code = await asyncio.to_thread(victim.wait, budget + 5)
        assert code == 0, victim.log()[-3000:]
        shutdown = replica_events(victim, "shutdown")
        assert [e["msg"] for e in shutdown] == ["shutdown: everything acknowledged is persisted"]
        stopped_at = len(traffic.acks)
        await traffic.wait_for_acks(stopped_at + 1000)  # two replicas carry the load

        await asyncio.to_thread(topology.start_replica, victim)
        # nginx tries the replica again once its fail_timeout (5 s) has passed.
        await eventually(
            lambda: took_traffic(victim), "nginx sends traffic to the restarted replica", within=15
        )
        await traffic.wait_for_acks(len(traffic.acks) + 1000)
    got, caught_up = await wait_until_explained(database_url, traffic)

    statuses = traffic.statuses()
    unknown = traffic.unknown()
    assert set(statuses) <= {202, 502}, lb_statuses(traffic)
    assert unexplained(got, traffic) == {}
    assert caught_up <= PROMISE_SECONDS
    # The restarted replica is a new incarnation of the same REPLICA_ID.
    assert (await incarnations(database_url))[topology.replica_ids[1]] == 2
    acknowledged = traffic.acknowledged()
    counted_unknown = sum(got.get(k, 0) - acknowledged[k] for k in set(got) | set(acknowledged))
    retried, retried_502 = lb_retries(topology)
    assert retried_502 == 0
    print(
        f"\nSIGTERM + restart: {len(traffic.sent)} sent, statuses {lb_statuses(traffic)}; "
        f"{len(unknown)} answered 502 by nginx (outcome unknown: a POST already sent is not "
        f"retried), worth {sum(s.value for s in unknown)}, of which {counted_unknown} was "
        f"counted; {retried} requests passed on to another replica after a refused connect; "
        f"persisted exactly {caught_up:.2f}s after the load stopped; nginx error log: "
        f"{dict(topology.lb.upstream_errors())}"
    )


# --- 3. One replica SIGKILLed under load ---------------------------------------------------


async def test_replica_sigkill_under_load_loses_at_most_its_unflushed_interval(
    topology: NativeTopology, database_url: str
) -> None:
    victim = topology.replicas[2]
    margin = 1.0  # a flush in progress, and a loaded machine

    # A distinct key per request, value 1: a persisted key is exactly one increment.
    async with Traffic(topology.url, lambda n: (f"kill-{n:07d}", 1)) as traffic:
        await traffic.wait_for_acks(500)
        await eventually(
            lambda: len(applied_flushes(victim.log())) >= 3,
            "three batches of the victim applied",
            within=20,
        )
        # Late in the victim's flush interval, so the loss measured is close to the worst case.
        last = log_wall(applied_flushes(victim.log())[-1]["ts"])
        target = last + 0.85 * FLUSH_INTERVAL
        while target < time.time() + 0.05:
            target += FLUSH_INTERVAL
        await asyncio.sleep(target - time.time())
        killed_wall, killed_at = time.time(), time.monotonic()
        victim.signal(signal.SIGKILL)
        code = await asyncio.to_thread(victim.wait, 10)
        # The load balancer routes around it.
        await traffic.wait_for_acks(len(traffic.acks) + 1000)
    assert code == -signal.SIGKILL

    # Stop the survivors (final flush), let the victim's backends finish: the table is final.
    topology.stop()
    assert await wait_until_no_other_backends(database_url) == []
    got = await persisted(database_url)
    answered_by = topology.lb.answered_by()
    sent = traffic.sent
    acked = [s for s in sent if s.acknowledged]
    assert all(s.request_id in answered_by for s in acked), "nginx logged every answer"
    by_victim = [s for s in acked if answered_by[s.request_id] == victim.port]
    attempted = traffic.attempted()

    # Exact facts, not clocks: the victim logged how many keys each batch it applied held (a
    # distinct key per request: how many requests), so that many of the requests it handled
    # must be in Postgres; what else it acknowledged is what it had not flushed, the most it
    # may lose. (Unanswered requests it handled may have been applied too: their number
    # widens the bound exactly.)
    handled = [s for s in sent if answered_by.get(s.request_id) == victim.port]
    applied = applied_requests(victim.log())
    assert applied > 0, "the victim applied batches before the kill"
    assert len({s.key for s in handled} & set(got)) >= applied, "what it applied is persisted"
    unanswered = len(handled) - len(by_victim)
    unflushed_count = len(by_victim) - applied + unanswered
    assert set(got) <= set(attempted)
    for key in got:
        assert got[key] <= attempted[key], key
    lost = [s for s in acked if got.get(s.key, 0) < 1]
    assert all(answered_by[s.request_id] == victim.port for s in lost), "only the victim lost"
    assert len(lost) <= unflushed_count
    last_freeze = last_applied_freeze(victim.log(), killed_wall)
    assert last_freeze is not None
    # The window is one interval (plus a flush in progress): the freeze and the oldest loss.
    window = killed_wall - last_freeze
    oldest_lost = max((killed_at - s.answered_at for s in lost), default=0.0)
    assert window <= FLUSH_INTERVAL + margin
    assert oldest_lost <= FLUSH_INTERVAL + margin

    unknown = traffic.unknown()
    assert set(traffic.statuses()) <= {202, 502}, lb_statuses(traffic)
    last_502 = max((s.answered_at - killed_at for s in unknown), default=0.0)
    retried, retried_502 = lb_retries(topology)
    assert retried_502 == 0
    print(
        f"\nSIGKILL window (FLUSH_INTERVAL_SECONDS={FLUSH_INTERVAL:g}): the victim's last "
        f"applied batch was frozen {window:.3f}s before the kill; the victim acknowledged "
        f"{len(by_victim)} of {len(acked)} increments, {unflushed_count} beyond what it applied; "
        f"{len(lost)} acknowledged increments lost, the oldest acknowledged {oldest_lost:.3f}s "
        f"before the kill. nginx: {len(unknown)} answered 502 (outcome unknown, "
        f"{sum(1 for s in unknown if s.key in got)} of them persisted), the last "
        f"{last_502:.3f}s after the kill, {retried} passed on to another replica after a "
        f"refused connect; statuses {lb_statuses(traffic)}; nginx error log: "
        f"{dict(topology.lb.upstream_errors())}"
    )


# --- 4. Postgres restarted under load ------------------------------------------------------


async def test_postgres_restart_under_load_is_exact(
    cluster: PgCluster, redis_url: str, tmp_path: Path
) -> None:
    with NativeTopology(
        tmp_path, database_url=cluster.url, redis_url=redis_url, variables=COMPOSE_VARIABLES
    ) as topology:
        probe = topology.replicas[0]
        async with Traffic(topology.url, lambda n: (f"pg-{n % 300:03d}", 1 + n % 5)) as traffic:
            await traffic.wait_for_acks(1000)

            def some_persisted() -> bool:
                return bool(asyncio.run(persisted(cluster.url)))

            await eventually(some_persisted, "written behind as usual before the stop", within=10)
            await asyncio.to_thread(cluster.stop)
            down_at, acks_before = time.monotonic(), len(traffic.acks)
            status, body = await asyncio.to_thread(http_get, probe.url + "/api/health")
            assert status == 503, body

            def flushes_failed() -> bool:
                return all(
                    (scrape_metric(r.url, "increment_flush_failures_total") or 0) >= 2
                    for r in topology.replicas
                )

            await eventually(flushes_failed, "every replica's flushes fail", within=15)
            # Still 202 while Postgres is down.
            await traffic.wait_for_acks(len(traffic.acks) + 1000)
            await asyncio.to_thread(cluster.start)
            down_for = time.monotonic() - down_at
            acks_while_down = len(traffic.acks) - acks_before
            for replica in topology.replicas:
                await asyncio.to_thread(wait_until_healthy, replica.url, 15)
            await traffic.wait_for_acks(len(traffic.acks) + 1000)
        got, caught_up = await wait_until_explained(cluster.url, traffic)
        # Stopped (final flushes): still exactly what was acknowledged.
        topology.stop()
        assert await persisted(cluster.url) == got

    statuses = traffic.statuses()
    answers_503 = [s for s in traffic.sent if s.status == 503]
    # No 5xx but the service's documented backpressure answer (503 with Retry-After).
    assert set(statuses) <= {202, 503}, lb_statuses(traffic)
    assert all(s.retry_after for s in answers_503)
    assert traffic.unknown() == []
    assert got == dict(traffic.acknowledged())
    assert caught_up <= PROMISE_SECONDS
    print(
        f"\nPostgres restart: down {down_for:.1f}s, {acks_while_down} increments acknowledged "
        f"while it was down, statuses {lb_statuses(traffic)}; persisted exactly "
        f"{caught_up:.2f}s after the load stopped"
    )
