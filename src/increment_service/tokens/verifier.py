"""The token check of one process: a cache in front of Postgres, and its bounds.

* A hit costs a SHA-256 and a dict lookup: no I/O, no await. A verified token is trusted for
  ``CACHE_TTL_SECONDS`` from when its lookup began; a token in use is looked up again in the
  background after half of that, so a busy token never misses. So a revocation whose
  notification is lost (listener.py) is honoured within ``CACHE_TTL_SECONDS`` anyway.
* Misses are single-flighted (one lookup per token at a time, shared by every request that
  waits for it) and batched: one lookup statement in flight per process, at most
  ``BATCH_MAX`` tokens each, at most one every ``MIN_LOOKUP_INTERVAL_SECONDS``. Tokens known
  to be good (refreshes) go first; at most ``MAX_WAITING`` unknown ones wait, and a miss
  beyond that is answered 503 at once. So a flood of distinct well-formed bad tokens (the
  format is public) costs Postgres a bounded number of statements per second.
* Tokens Postgres does not know are remembered (``NEGATIVE_*``): asking again costs nothing.
* Postgres unreachable: a token verified before stays accepted (its expiry still honoured),
  an unknown one is answered 503 (never 401: nobody can say it is bad).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import asyncpg

from ..db import OUTAGE_ERRORS
from ..errors import InvalidToken, ServiceUnavailable
from ..metrics import Metrics
from . import store
from .format import digest, well_formed
from .store import Grant

log = logging.getLogger(__name__)

CACHE_TTL_SECONDS = 1.0
CACHE_MAX_ENTRIES = 10_000
NEGATIVE_TTL_SECONDS = 60.0
NEGATIVE_MAX_ENTRIES = 10_000
BATCH_MAX = 256
MAX_WAITING = 1024
MIN_LOOKUP_INTERVAL_SECONDS = 0.01
LOOKUP_TIMEOUT_SECONDS = 2.0
#: After a lookup failed for an outage: how long known tokens are accepted from the cache
#: without waiting for Postgres, and unknown ones answered 503 at once.
OUTAGE_SECONDS = 1.0

MALFORMED = "the token is malformed"
UNKNOWN = "the token is unknown or revoked"
EXPIRED = "the token has expired"

Clock = Callable[[], float]


class LookupFailed(Exception):
    """Postgres could not say (an outage): the caller falls back on what it knew."""


@dataclasses.dataclass(slots=True)
class _Entry:
    grant: Grant
    fresh_until: float  # monotonic
    refresh_after: float  # monotonic


class TokenVerifier:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.pool = pool
        # Public: a test moves them by hand.
        self.clock, self.wall = clock, wall
        self._cache: dict[bytes, _Entry] = {}
        self._negative: dict[bytes, float] = {}  # digest -> until (monotonic)
        # Tokens waiting for a lookup, known ones (refreshes) apart from unknown ones.
        self._known: dict[bytes, asyncio.Future[Grant | None]] = {}
        self._unknown: dict[bytes, asyncio.Future[Grant | None]] = {}
        self._inflight: dict[bytes, asyncio.Future[Grant | None]] = {}
        self._draining: asyncio.Task[None] | None = None
        # Bumped by every eviction: a lookup that began before one caches nothing.
        self._epoch = 0
        self._outage_until = 0.0
        #: token id -> when last used (Unix seconds), taken by usage.py in batches.
        self.used: dict[uuid.UUID, float] = {}
        self.closing = False
        checks, refusals = metrics.token_checks, metrics.token_refusals
        self._hit, self._miss = checks.labels("hit"), checks.labels("miss")
        self._refresh, self._stale = checks.labels("refresh"), checks.labels("stale")
        self._refused = {reason: refusals.labels(reason) for reason in REASONS}
        self.lookups, self.looked_up = metrics.token_lookups, metrics.token_lookup_tokens

    # -- the check -----------------------------------------------------------------------

    async def check(self, token: str) -> Grant:
        """The token's grant; InvalidToken (401) or ServiceUnavailable (503) otherwise."""
        key = digest(token)
        entry = self._cache.get(key)
        now = self.clock()
        if entry is not None:
            grant, wall = entry.grant, self.wall()
            if grant.expires_at is not None and wall >= grant.expires_at:
                raise self.refuse("expired", EXPIRED)
            if now < entry.fresh_until:
                self._hit.inc()
                if now >= entry.refresh_after and key not in self._inflight:
                    self._refresh.inc()
                    self._enqueue(key, known=True)
                self.used[grant.token_id] = wall
                return grant
            if now < self._outage_until:
                return self._accept_stale(key, grant)
        elif not well_formed(token):
            raise self.refuse("malformed", MALFORMED)
        else:
            until = self._negative.get(key)
            if until is not None:
                if now < until:
                    raise self.refuse("unknown", UNKNOWN)
                del self._negative[key]
            if now < self._outage_until:
                raise self.unavailable()
        self._miss.inc()
        try:
            found = await asyncio.shield(self._enqueue(key, known=entry is not None))
        except LookupFailed:
            entry = self._cache.get(key)  # not if it was revoked meanwhile
            if entry is None:
                raise self.unavailable() from None
            if entry.grant.expires_at is not None and self.wall() >= entry.grant.expires_at:
                raise self.refuse("expired", EXPIRED) from None
            return self._accept_stale(key, entry.grant)
        if found is None:
            raise self.refuse("unknown", UNKNOWN)
        if found.expires_at is not None and self.wall() >= found.expires_at:
            raise self.refuse("expired", EXPIRED)
        self.used[found.token_id] = self.wall()
        return found

    def _accept_stale(self, key: bytes, grant: Grant) -> Grant:
        """Postgres cannot say: a token verified before is accepted. (Once the outage's
        window has passed, the next request of the token tries Postgres again.)"""
        self._stale.inc()
        self.used[grant.token_id] = self.wall()
        return grant

    def refuse(self, reason: str, detail: str) -> InvalidToken:
        self._refused[reason].inc()
        return InvalidToken(detail)

    def unavailable(self, busy: bool = False) -> ServiceUnavailable:
        self._refused["busy" if busy else "unavailable"].inc()
        why = "too many unknown tokens are being checked" if busy else "the token database"
        return ServiceUnavailable(f"{why}: the token cannot be checked now; retry later")

    def count_refusal(self, reason: str) -> None:
        self._refused[reason].inc()

    # -- lookups: single-flighted, batched, bounded ---------------------------------------

    def _enqueue(self, key: bytes, *, known: bool) -> asyncio.Future[Grant | None]:
        future = self._inflight.get(key)
        if future is not None:
            return future
        if not known and len(self._unknown) >= MAX_WAITING:
            raise self.unavailable(busy=True)
        future = asyncio.get_running_loop().create_future()
        # Retrieved even if nobody waits (a refresh): no "exception never retrieved".
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._inflight[key] = future
        (self._known if known else self._unknown)[key] = future
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(), name="token lookups")
        return future

    async def _drain(self) -> None:
        """Look up what waits, one statement at a time, until nothing waits."""
        try:
            last = -MIN_LOOKUP_INTERVAL_SECONDS
            while (self._known or self._unknown) and not self.closing:
                pause = last + MIN_LOOKUP_INTERVAL_SECONDS - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                last = time.monotonic()
                await self._lookup(self._take())
        finally:
            self._draining = None
            if self.closing:
                self._fail(list(self._known) + list(self._unknown))

    def _take(self) -> list[bytes]:
        batch: list[bytes] = []
        for waiting in (self._known, self._unknown):
            while waiting and len(batch) < BATCH_MAX:
                batch.append(_pop_first(waiting))
        return batch

    async def _lookup(self, batch: list[bytes]) -> None:
        started, epoch = self.clock(), self._epoch
        self.lookups.inc()
        self.looked_up.inc(len(batch))
        try:
            async with self.pool.acquire(timeout=LOOKUP_TIMEOUT_SECONDS) as conn:
                found = await store.grants(conn, batch, LOOKUP_TIMEOUT_SECONDS)
        except OUTAGE_ERRORS as exc:
            if not self._outage_until:  # said once per outage, not once per lookup
                log.warning(
                    "token lookups failing: tokens verified before are accepted from the"
                    " cache, unknown ones answered 503",
                    extra={"event": "token-lookup", "error": f"{type(exc).__name__}: {exc}"},
                )
            self._outage_until = self.clock() + OUTAGE_SECONDS
            # What waits would meet the same outage: answered now (stale grants, or 503).
            self._fail([*batch, *self._known, *self._unknown])
            return
        except BaseException:
            self._fail(batch)
            raise
        self._outage_until = 0.0
        for key in batch:
            grant = found.get(key)
            if grant is None:
                self.evict(key)
                self._remember_unknown(key)
            elif epoch == self._epoch:
                self._remember(key, grant, started)
            future = self._inflight.pop(key, None)
            if future is not None and not future.done():
                future.set_result(grant)

    def _fail(self, batch: list[bytes]) -> None:
        for key in batch:
            self._known.pop(key, None)
            self._unknown.pop(key, None)
            future = self._inflight.pop(key, None)
            if future is not None and not future.done():
                future.set_exception(LookupFailed())

    # -- the caches ----------------------------------------------------------------------

    def _remember(self, key: bytes, grant: Grant, started: float) -> None:
        cache = self._cache
        cache.pop(key, None)  # re-inserted last: the dict is oldest-first
        if len(cache) >= CACHE_MAX_ENTRIES:
            del cache[next(iter(cache))]
        cache[key] = _Entry(grant, started + CACHE_TTL_SECONDS, started + CACHE_TTL_SECONDS / 2)

    def _remember_unknown(self, key: bytes) -> None:
        negative = self._negative
        if len(negative) >= NEGATIVE_MAX_ENTRIES:
            del negative[next(iter(negative))]
        negative[key] = self.clock() + NEGATIVE_TTL_SECONDS

    def evict(self, key: bytes) -> None:
        """A revoked token: forgotten, and never accepted from the cache again."""
        self._epoch += 1
        self._cache.pop(key, None)

    def expire_all(self) -> None:
        """Notifications may have been lost: every token is looked up again before its next
        use. The entries stay, for an outage (a token verified before stays accepted)."""
        self._epoch += 1
        for entry in self._cache.values():
            entry.fresh_until = entry.refresh_after = 0.0

    def take_used(self) -> dict[uuid.UUID, float]:
        used, self.used = self.used, {}
        return used

    async def close(self) -> None:
        self.closing = True
        if self._draining is not None:
            self._draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._draining


#: Why a token was refused (the label values of the refusals metric).
REASONS = ("malformed", "unknown", "expired", "scope", "unavailable", "busy", "query")


def _pop_first(waiting: dict[bytes, asyncio.Future[Grant | None]]) -> bytes:
    key = next(iter(waiting))
    del waiting[key]
    return key
