"""What a batch's outcome means for the replica, whoever sent it (the flusher or the durable
committer): keys it found applied are remembered for retries, replays and conflicts counted,
rejected deltas counted and logged."""

from __future__ import annotations

import logging

from ..metrics import Metrics
from .aggregator import Aggregator
from .items import Batch, Keyed, Recorded
from .records import Applied

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


def settle_keyed(aggregator: Aggregator, metrics: Metrics, batch: Batch, applied: Applied) -> None:
    """Remember every key the batch carried, with its record (what its first answer said);
    count (and log) the keyed requests that were not applied."""
    conflicts: list[Keyed] = []
    for n, request in enumerate(batch.requests):
        if not isinstance(request, Keyed):
            continue
        recorded = applied.recorded_before.get(n)
        if n in applied.claimed or recorded is None:
            # Applied by this batch; or, found applied and its record not seen (a retry of
            # this very batch, the record expired meanwhile): its own outcome.
            mine = Recorded(
                request.fingerprint,
                request.durable,
                applied.not_applied.get(n, ()),
                applied.totals.get(n),
            )
            aggregator.remember(request.ident, mine)
            continue
        if recorded.fingerprint == request.fingerprint:
            # Applied before, by this request's first attempt (on this or another replica).
            metrics.idempotent_replays.labels("flush").inc()
        else:
            # Another body under a key already used: never applied.
            metrics.idempotency_conflicts.labels("flush").inc()
            conflicts.append(request)
        aggregator.remember(request.ident, recorded, applied.recorded_age.get(n, 0.0))
    if conflicts:
        log.warning(
            "keyed requests dropped: their Idempotency-Key was used for another body",
            extra={
                "event": "idempotency-conflict",
                "replica_id": batch.replica_id,
                "seq": batch.seq,
                "requests": len(conflicts),
                "keys": [request.key[:64] for request in conflicts[:20]],
            },
        )


def record_rejections(metrics: Metrics, batch: Batch, applied: Applied) -> None:
    """Deltas that were not applied (their totals would have left bigint): of the summed
    deltas, by counter key; of requests, by item."""
    items = sum(len(indexes) for indexes in applied.not_applied.values())
    if not applied.rejected and not items:
        return
    metrics.overflow_rejected.inc(len(applied.rejected) + items)
    log.error(
        "deltas rejected: the counter would leave the bigint range",
        extra={
            "event": "overflow",
            "replica_id": batch.replica_id,
            "seq": batch.seq,
            "rejected_keys": list(applied.rejected[:20]),
            "rejected": len(applied.rejected),
            "rejected_items": items,
        },
    )
