"""What a batch's outcome means for the replica, whoever sent it (the flusher or the durable
committer): keys it found applied are remembered for retries, replays and conflicts counted,
rejected deltas counted and logged."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..metrics import Metrics
from .aggregator import Aggregator
from .items import Batch, Ident, Keyed
from .store import Applied

log = logging.getLogger("increment_service.writebehind")  # one logger for the package


def settle_keyed(aggregator: Aggregator, metrics: Metrics, batch: Batch, applied: Applied) -> None:
    """Remember what was applied; count (and log) the keyed requests that were not."""
    found: list[tuple[Ident, bytes]] = []
    conflicts: list[Keyed] = []
    for n, request in enumerate(batch.keyed):
        if n in applied.claimed:
            found.append((request.ident, request.fingerprint))
            continue
        recorded = applied.recorded_before.get(n)
        if recorded is None or recorded == request.fingerprint:
            # Applied before, by this request's first attempt (on this or another replica),
            # or by a statement that committed while this one ran (unseen: the same key
            # from two replicas at once is a retry, hence the same body, almost surely).
            metrics.idempotent_replays.labels("flush").inc()
            found.append((request.ident, recorded or request.fingerprint))
        else:
            # Another body under a key already used: never applied.
            metrics.idempotency_conflicts.labels("flush").inc()
            conflicts.append(request)
            found.append((request.ident, recorded))
    aggregator.remember(found)
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


def record_rejections(metrics: Metrics, batch: Batch, keys: Sequence[str]) -> None:
    """Deltas that were not applied: their totals would have left bigint."""
    metrics.overflow_rejected.inc(len(keys))
    log.error(
        "deltas rejected: the counter would leave the bigint range",
        extra={
            "event": "overflow",
            "replica_id": batch.replica_id,
            "seq": batch.seq,
            "rejected_keys": list(keys[:20]),
            "rejected": len(keys),
        },
    )
