"""Forwarded addresses: the replicas believe X-Forwarded-For from nginx alone.

Issue 9, item 5: with compose's old default (every private range trusted), 120 failed logins
from one client with a spoofed X-Forwarded-For got no 429, because a client on a private network
was itself "a trusted proxy" and could name itself anyone. client_address already takes the
right-most untrusted address; what matters is that only the load balancer is trusted.

Natively (tests/support/topology.py's NativeTopology): the client on 127.0.0.2, nginx on 127.0.0.1,
replicas that trust 127.0.0.1 alone, set the way a compose user would (TRUSTED_PROXIES in .env).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from increment_service import throttle
from increment_service.settings import Settings
from tests.support.compose import compose_app_environment, compose_file
from tests.support.nginx import nginx_binary
from tests.support.topology import NativeTopology

CLIENT = "127.0.0.2"  # the attacker
NGINX = "127.0.0.1"  # where the native nginx listens and connects to the replicas from
PASSWORD = "correct horse battery"

needs_nginx = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx (Debian package nginx) is needed"
)


# --- compose -------------------------------------------------------------------------------


def test_compose_trusts_the_load_balancer_alone() -> None:
    compose = compose_file()
    services, networks = compose["services"], compose.get("networks") or {}
    trusted = Settings.from_env(compose_app_environment()).trusted_proxies
    assert len(trusted) == 1
    assert trusted[0].num_addresses == 1, f"a range is trusted: {trusted[0]}"
    lb_address = trusted[0].network_address

    # lb sits on one network, at exactly that address, which no other container can get.
    (network, attachment), *others = services["lb"]["networks"].items()
    assert not others, "lb on a second network would reach the replicas from another address"
    assert ipaddress.ip_address(attachment["ipv4_address"]) == lb_address
    (config,) = networks[network]["ipam"]["config"]
    assert lb_address in ipaddress.ip_network(config["subnet"])
    assert lb_address not in ipaddress.ip_network(config["ip_range"])
    assert ipaddress.ip_address(config["gateway"]) != lb_address
    # On that network: lb and the replicas, nothing else.
    members = {name for name, service in services.items() if network in service.get("networks", [])}
    assert members == {"lb", "app"}


# --- through nginx, for real -----------------------------------------------------------------


@pytest.fixture
def topology(
    request: pytest.FixtureRequest,
    clean: None,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> Iterator[NativeTopology]:
    """The native topology; ``request.param``: (TRUSTED_PROXIES, replicas)."""
    trusted, replicas = request.param
    with NativeTopology(
        tmp_path,
        database_url=database_url,
        redis_url=redis_url,
        variables={"TRUSTED_PROXIES": trusted},
        replicas=replicas,
    ) as running:
        yield running


async def failed_logins(url: str, client: str, count: int, spoof: bool = True) -> list[int]:
    """``count`` logins with unknown emails (one per email: the account limit never applies)
    from ``client``, each with another spoofed X-Forwarded-For; their statuses."""
    connector = aiohttp.TCPConnector(local_addr=(client, 0), limit=6)
    gate = asyncio.Semaphore(6)

    async def attempt(http: aiohttp.ClientSession, n: int) -> int:
        headers = {}
        if spoof:  # a new address each time, alone or in front of another made-up hop
            forged = f"203.0.113.{n % 250 + 1}"
            headers["X-Forwarded-For"] = forged if n % 2 else f"{forged}, 198.51.100.{n % 7}"
        body: dict[str, Any] = {"email": f"nobody-{n}@example.com", "password": PASSWORD}
        async with gate, http.post(url + "/api/sessions", json=body, headers=headers) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(connector=connector) as http:
        return list(await asyncio.gather(*(attempt(http, n) for n in range(count))))


@needs_nginx
@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", [(NGINX, None)], indirect=True)
async def test_spoofed_forwarded_for_through_nginx_is_still_throttled(
    topology: NativeTopology,
) -> None:
    extra = 10
    statuses = await failed_logins(topology.url, CLIENT, throttle.ADDRESS_LIMIT + extra)
    # Counted before bcrypt, atomically in Redis, whichever replica answered: exactly the limit.
    assert Counter(statuses) == {401: throttle.ADDRESS_LIMIT, 429: extra}
    # nginx saw the real client, and the replicas counted that, not the made-up addresses.
    assert {entry["remote_addr"] for entry in topology.lb.access_log()} == {CLIENT}
    # Straight to a replica (not through nginx), the spoofed header is not believed either.
    (direct,) = await failed_logins(topology.replicas[0].url, CLIENT, 1)
    assert direct == 429
    # Another client is not throttled for it.
    (other,) = await failed_logins(topology.url, "127.0.0.3", 1, spoof=False)
    assert other == 401


@needs_nginx
@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", [("127.0.0.0/8", 1)], indirect=True)
async def test_trusting_a_range_clients_come_from_lets_them_rotate_their_address(
    topology: NativeTopology,
) -> None:
    """The hole itself, as compose's old default (the private ranges) left it: the client's
    own address is "a trusted proxy", so the made-up address in front of it is counted."""
    statuses = await failed_logins(topology.url, CLIENT, throttle.ADDRESS_LIMIT + 10)
    assert set(statuses) == {401}
