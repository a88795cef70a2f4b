"""Brute-force limits in Redis: failed logins per account and per client address, and account
creations per client address.

Every attempt is counted *before* the bcrypt work it would cost, so a burst of concurrent
requests cannot slip past the limit while bcrypt runs. A successful login then takes its
attempt back (and clears the account's count), so only failures use up the login budget; an
account creation keeps its count, success or not, since creating accounts in bulk is the abuse.
Windows are fixed: the first counted attempt starts a ``WINDOW_SECONDS`` expiry, and when it
runs out the count is gone. There is no permanent lockout, only a wait of at most one window.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math

import redis.asyncio
from aiohttp import web

from .errors import TooManyRequests

#: Failed logins allowed per account (email key, whether or not it exists) in one window.
ACCOUNT_LIMIT = 10
#: Failed logins allowed per client address in one window (NAT: many users, one address).
ADDRESS_LIMIT = 50
#: Account creations (valid requests, each one bcrypt hash) per client address in one window.
#: A person creates one account and may retry a few times; twenty leaves room for a small
#: office behind one NAT address, while a flood from one address gets twenty hashes (a few
#: CPU seconds) per window instead of several per second.
SIGNUP_LIMIT = 20
WINDOW_SECONDS = 15 * 60

_PREFIX = "INCREMENT_THROTTLE:login:"
_SIGNUP_PREFIX = "INCREMENT_THROTTLE:signup:address:"

# Decrement only a count that still exists: after its window expired, a bare DECR would
# create a key at -1 without an expiry.
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.call('DECR', KEYS[1])
end
return 0
"""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class Subjects:
    """The Redis keys counting one login attempt (no account key for an email that can never
    match an account: only its address is counted)."""

    account: str | None
    address: str

    @classmethod
    def of(cls, email_key: str | None, address: str) -> Subjects:
        """``email_key``: the normal form (emails.email_key) the account is looked up by, so
        every spelling that reaches an account shares its budget. Hashed: Redis holds no email
        addresses."""
        account = None
        if email_key is not None:
            digest = hashlib.sha256(email_key.encode("utf-8")).hexdigest()
            account = f"{_PREFIX}account:{digest}"
        return cls(account, f"{_PREFIX}address:{address}")


async def count_attempt(client: redis.asyncio.Redis, subjects: Subjects) -> None:
    """Count one login; raise TooManyRequests if the account or the address is over its limit."""
    limits = [(subjects.address, ADDRESS_LIMIT)]
    if subjects.account is not None:
        limits.append((subjects.account, ACCOUNT_LIMIT))
    await _count(client, limits, "too many failed logins; retry later")


async def count_signup(client: redis.asyncio.Redis, address: str) -> None:
    """Count one account creation; raise TooManyRequests if the address is over its limit."""
    await _count(
        client, [(_SIGNUP_PREFIX + address, SIGNUP_LIMIT)], "too many new accounts; retry later"
    )


async def _count(client: redis.asyncio.Redis, limits: list[tuple[str, int]], detail: str) -> None:
    async with client.pipeline(transaction=True) as pipe:
        for key, _ in limits:
            # SET NX EX then INCR (which keeps the expiry): EXPIRE ... NX needs Redis 7 and
            # the embedded server is 6.2. In one MULTI, a count never exists without expiry.
            pipe.set(key, 0, ex=WINDOW_SECONDS, nx=True)
            pipe.incr(key)
            pipe.pttl(key)
        results = await pipe.execute()
    waits = [
        pttl
        for (_, limit), count, pttl in zip(limits, results[1::3], results[2::3], strict=True)
        if count > limit
    ]
    if waits:
        retry_after = max(1, math.ceil(max(waits) / 1000)) if max(waits) > 0 else WINDOW_SECONDS
        raise TooManyRequests(detail, headers={"Retry-After": str(retry_after)})


async def record_success(client: redis.asyncio.Redis, subjects: Subjects) -> None:
    """The attempt was not a failure: clear the account's count, give the address its one back."""
    async with client.pipeline(transaction=True) as pipe:
        if subjects.account is not None:
            pipe.delete(subjects.account)
        pipe.eval(_GIVE_BACK, 1, subjects.address)
        await pipe.execute()


def client_address(request: web.Request, trusted_proxies: tuple[Network, ...]) -> str:
    """The address the per-address limit counts.

    The peer address, unless the peer is a trusted proxy (TRUSTED_PROXIES): then the right-most
    X-Forwarded-For entry that is not itself a trusted proxy. Entries left of it were written
    by the client and could name anyone, so they are never believed.
    """
    peer = request.remote or "unknown"
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer
    chain = ",".join(request.headers.getall("X-Forwarded-For", []))
    hops = [hop.strip() for hop in chain.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain: count the proxy, not a name the client chose
        if not any(address in network for network in trusted_proxies):
            return str(address)
    return peer


def _is_trusted(peer: str, trusted_proxies: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:  # a unix socket peer has no IP address
        return False
    return any(address in network for network in trusted_proxies)
