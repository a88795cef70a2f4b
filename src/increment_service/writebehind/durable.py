"""Durable acknowledgement (``Prefer: durable``): group commit.

The replica's waiting durable requests are committed together, one group at a time: the next
group starts as soon as the previous one commits. A group is one batch under an id of its own
(``<incarnation>/durable``, a sequence of its own) in the same ledger as the timer's batches:
it commits beside them, never as part of them, and a retry of it under the same id adds
nothing twice. A request still waiting after ``durable_timeout`` is answered: NOT_SENT if its
group never went to Postgres (and then it never will), UNKNOWN if it did (the group is retried
under the same id until its outcome is known). At shutdown no group is sent any more: a request
waiting for one is answered NOT_SENT at once (``shut``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time

import asyncpg

from ..metrics import Metrics
from .aggregator import Aggregator
from .backoff import Backoff
from .backoff import cancelling as _cancelling
from .clock import PostgresClock
from .items import Batch, Ident, Keyed, Recorded, Request, Totals
from .records import Applied
from .settle import record_rejections, settle_keyed
from .store import apply_batch

log = logging.getLogger("increment_service.writebehind")  # one logger for the package

#: A group's retries wait at most this long between attempts.
_MAX_BACKOFF_SECONDS = 1.0


class Durable(enum.Enum):
    """How a durable request ended (see GroupCommitter.commit)."""

    COMMITTED = "committed"  # in Postgres (some items may be rejected: see .rejected)
    REPLAY = "replay"  # its key was applied before, with this body: committed then
    CONFLICT = "conflict"  # its key was applied before, with another body: never applied
    NOT_SENT = "not-sent"  # never sent to Postgres: nothing applied
    UNKNOWN = "unknown"  # sent, no answer in time: the group is retried until it is known


@dataclasses.dataclass(frozen=True, slots=True)
class DurableAnswer:
    outcome: Durable
    #: The indexes of the request's items that were not applied (their counter would have
    #: left bigint): this request's own, or, for a replay, what its first answer said.
    not_applied: tuple[int, ...] = ()
    #: For a replay or a conflict: the record of the key (who owns it, what it was told).
    record: Recorded | None = None
    #: return=representation: its running totals (its own, or, for a replay, its record's).
    totals: Totals | None = None


@dataclasses.dataclass(eq=False, slots=True)
class _Waiting:
    """A durable request waiting for the commit of its group."""

    request: Request
    answer: asyncio.Future[DurableAnswer]
    sent: bool = False  # its group's statement went to Postgres
    abandoned: bool = False  # answered 503 before it was sent: it must never be


class GroupCommitter:
    """Commits the durable requests of one replica (one worker process), a group at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        aggregator: Aggregator,
        *,
        durable_id: str,
        durable_timeout: float,
        idempotency_ttl: float,
        postgres_clock: PostgresClock | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        # The written-behind side: the backpressure limit is shared, and keys found applied
        # are remembered there for the retries that come back.
        self.aggregator = aggregator
        self.durable_id = durable_id
        self.durable_timeout = durable_timeout
        self.idempotency_ttl = idempotency_ttl
        # Postgres's clock as last seen, shared by the write-behind's statements (store.py).
        self.postgres_clock = postgres_clock or PostgresClock()
        self._seq = 0
        self._waiting: list[_Waiting] = []
        self._waiting_keys: dict[Ident, _Waiting] = {}
        self._wakeup = asyncio.Event()
        self._in_commit: asyncio.Future[None] | None = None
        self._group: list[_Waiting] = []  # the group of _in_commit, until it ends
        self._task: asyncio.Task[None] | None = None
        self._shut = False  # shutdown began: no group is sent any more
        self._give_up: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._commit_groups(), name="durable committer")

    @property
    def committing(self) -> bool:
        """A durable group is on its way to Postgres (or retried for its outcome)."""
        return self._in_commit is not None and not self._in_commit.done()

    def waiting(self, ident: Ident) -> bool:
        """A durable request with this key waits for its commit here (a retry gets 409)."""
        return ident in self._waiting_keys

    @property
    def waiting_items(self) -> int:
        return sum(len(w.request.items) for w in self._waiting)

    async def commit(self, request: Request) -> DurableAnswer:
        """Commit ``request`` (and its key, if it has one) with the next group, and say how it
        went."""
        if self._shut:
            # Shutdown began: no group will be sent again, so nothing of this one would be.
            self.metrics.durable_requests.labels(Durable.NOT_SENT.value).inc()
            return DurableAnswer(Durable.NOT_SENT)
        pending = self.aggregator.pending_keys + self.waiting_items
        if pending + len(request.items) > self.aggregator.max_pending_keys:
            raise self.aggregator.refusal()  # the limit is the aggregator's, shared
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if isinstance(request, Keyed):
            self._waiting_keys[request.ident] = waiting
        self._wakeup.set()
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(asyncio.shield(waiting.answer), self.durable_timeout)
        except TimeoutError:
            if waiting.sent:
                answer = DurableAnswer(Durable.UNKNOWN)
            else:
                waiting.abandoned = True
                self._forget(waiting)
                answer = DurableAnswer(Durable.NOT_SENT)
        finally:
            self.metrics.durable_seconds.observe(time.perf_counter() - started)
        self.metrics.durable_requests.labels(answer.outcome.value).inc()
        return answer

    def shut(self, answer_within: float) -> None:
        """Shutdown began: no group is sent any more. A request waiting for a group that was
        never sent is answered NOT_SENT (``503 not-committed``) now; one whose group went to
        Postgres waits for its outcome ``answer_within`` seconds at most (the requests'
        drain ends then), and is then answered UNKNOWN. Later calls change nothing."""
        if self._shut:
            return
        self._shut = True
        for waiting in [*self._waiting, *self._group]:
            if waiting.sent or waiting.answer.done():
                continue
            waiting.abandoned = True  # if its group is taken, it leaves before it is sent
            waiting.answer.set_result(DurableAnswer(Durable.NOT_SENT))
            self._forget(waiting)
        commit = self._in_commit
        if commit is not None and not commit.done() and not any(w.sent for w in self._group):
            # Still waiting for a connection (or between attempts to get one): nothing of it
            # went out, and nothing will. Cancelled there, no statement is interrupted.
            commit.cancel()
        self._give_up = asyncio.get_running_loop().call_later(answer_within, self._unknown_now)

    def _unknown_now(self) -> None:
        for waiting in self._group:
            if waiting.sent and not waiting.answer.done():
                waiting.answer.set_result(DurableAnswer(Durable.UNKNOWN))

    @property
    def outstanding(self) -> bool:
        """A group went to Postgres and its outcome is not known yet."""
        commit = self._in_commit
        return commit is not None and not commit.done() and any(w.sent for w in self._group)

    async def settle(self, deadline: float) -> None:
        """At shutdown: wait until ``deadline`` (a time of the monotonic clock) for the outcome
        of a group still out, without cancelling it (it is retried under its id until known).
        A group not sent is not waited for: it never will be."""
        if self.outstanding:
            assert self._in_commit is not None
            await asyncio.wait({self._in_commit}, timeout=max(0.0, deadline - time.monotonic()))

    async def stop(self) -> None:
        """Stop committing, after ``settle`` (and after WriteBehind.close cut the connection of
        a group still out at the deadline): the tasks are cancelled and how each ended is
        retrieved (one left with an exception nobody retrieved is an ERROR with a traceback)."""
        if self._give_up is not None:
            self._give_up.cancel()
        self._unknown_now()  # any request still waiting is answered
        tasks = [t for t in (self._task, self._in_commit) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None:  # pragma: no cover -- _commit_group retries I/O errors
                log.error(
                    "durable committer failed",
                    extra={
                        "event": "durable",
                        "outcome": "bug",
                        "error": f"{type(error).__name__}: {error}",
                    },
                )

    def unanswered(self) -> tuple[int, dict[str, int]] | None:
        """After ``stop``: the group that went to Postgres and that no answer settled, as its
        sequence number and its sums per counter key (its outcome is unknown)."""
        commit = self._in_commit
        if commit is None or (
            commit.done() and not commit.cancelled() and commit.exception() is None
        ):
            return None
        sums: dict[str, int] = {}
        for waiting in self._group:
            if waiting.sent:
                for key, value in waiting.request.items:
                    sums[key] = sums.get(key, 0) + value
        return (self._seq, sums) if sums else None

    def _forget(self, waiting: _Waiting) -> None:
        request = waiting.request
        if isinstance(request, Keyed) and self._waiting_keys.get(request.ident) is waiting:
            del self._waiting_keys[request.ident]
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiting)

    async def _commit_groups(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            group = [w for w in self._waiting if not w.abandoned]
            self._waiting = []
            if group:
                self._group = group
                self._in_commit = asyncio.ensure_future(self._commit_group(group))
                try:
                    await self._in_commit
                except Exception:  # pragma: no cover -- a bug: answer, and go on committing
                    log.exception("durable group error", extra={"event": "durable"})
                    for waiting in group:
                        if not waiting.answer.done():
                            waiting.answer.set_result(DurableAnswer(Durable.UNKNOWN))
                finally:
                    for waiting in group:
                        self._forget(waiting)
                # Not when cancelled at shutdown: stop() and unanswered() look at it then.
                self._group = []
            if self._waiting:
                self._wakeup.set()

    async def _commit_group(self, group: list[_Waiting]) -> None:
        """Send ``group`` as one batch; retry it under the same id until its outcome is
        known. Requests that time out before it is sent leave it (they were answered 503)."""
        backoff = Backoff(cap=_MAX_BACKOFF_SECONDS)
        batch: Batch | None = None
        while True:
            try:
                async with self.pool.acquire(timeout=self.durable_timeout) as conn:
                    if batch is None:
                        group[:] = [w for w in group if not w.abandoned]
                        if not group:
                            return  # every request gave up before anything was sent
                        batch = self._group_batch(group)
                        for waiting in group:
                            waiting.sent = True
                        self.metrics.durable_group_size.observe(len(group))
                    applied = await apply_batch(
                        conn,
                        batch,
                        statement_timeout=max(5.0, self.durable_timeout),
                        idempotency_ttl=self.idempotency_ttl,
                        clock=self.postgres_clock,
                    )
            except Exception as exc:
                if _cancelling():
                    # Shutdown cancelled it: this error is the closed connection's; the cancel
                    # is what happened.
                    raise asyncio.CancelledError from exc
                wait = backoff.failed()
                self.metrics.flush_failures.inc()
                log.warning(
                    "durable group failed, will retry" if batch else "durable group not sent",
                    extra={
                        "event": "durable",
                        "outcome": "error",
                        "seq": batch.seq if batch else None,
                        "requests": len(group),
                        "error": f"{type(exc).__name__}: {exc}",
                        "attempt": backoff.failures,
                    },
                )
                await asyncio.sleep(wait)
                continue
            record_rejections(self.metrics, batch, applied)
            if batch.keyed:
                settle_keyed(self.aggregator, self.metrics, batch, applied)
            self._answer(group, batch, applied)
            return

    def _group_batch(self, group: list[_Waiting]) -> Batch:
        """One batch of a group: its requests in the order they came, never summed together
        (each is applied or refused as if it had committed alone)."""
        self._seq += 1
        requests = tuple(waiting.request for waiting in group)
        return Batch(self.durable_id, self._seq, [], [], time.monotonic(), requests=requests)

    def _answer(self, group: list[_Waiting], batch: Batch, applied: Applied) -> None:
        # The group's requests are the batch's, in the same order.
        for n, waiting in enumerate(group):
            if not waiting.answer.done():
                waiting.answer.set_result(_answer_of(n, waiting.request, applied))


def _answer_of(n: int, request: Request, applied: Applied) -> DurableAnswer:
    """What the ``n``-th request of a group is told."""
    mine = applied.not_applied.get(n, ())
    if not isinstance(request, Keyed) or n in applied.claimed:
        return DurableAnswer(Durable.COMMITTED, mine, totals=applied.totals.get(n))
    record = applied.recorded_before.get(n)
    if record is None:
        # Found applied, its record not seen: a retry of this very group, whose first
        # attempt committed (then its own outcome), or a record that expired meanwhile.
        return DurableAnswer(Durable.REPLAY, mine)
    if record.fingerprint == request.fingerprint:
        return DurableAnswer(Durable.REPLAY, record.not_applied, record, record.totals)
    return DurableAnswer(Durable.CONFLICT, record=record)
