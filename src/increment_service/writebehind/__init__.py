"""The write-behind: increments are summed in memory and applied to Postgres in batches.

A module per concern, from the bottom up:

* ``items``: what it holds and sends (``Keyed`` requests, ``Batch``, the int64 split);
* ``aggregator``: the in-memory part, free of I/O (``Aggregator``);
* ``statements``: the SQL, built from shared fragments;
* ``store``: ``apply_batch``, taking a connection, and how idempotency keys are claimed;
* ``inorder``: the arithmetic of applying requests in order (running totals, their bounds);
* ``upkeep``: pruning old batch ids and emptying the expired idempotency partition;
* ``clock``: Postgres's clock as last seen, to skip the key locks away from a boundary;
* ``backoff``: the one backoff of every retry loop;
* ``settle``: what a batch's outcome means for the replica (keys remembered, rejections logged);
* ``flusher``: the timer's flush loop, and the final flush;
* ``durable``: group commit of ``Prefer: durable`` requests;
* ``accept``: the accept policy (written behind, replay, conflict, durable wait), with the
  request fingerprint and the Idempotency-Key scope rule;
* ``service``: ``WriteBehind``, composing them.

The names below are the package's face: what the rest of the service (and the tests and the
benchmark) use.
"""

from .accept import Accepted, NotApplied, fingerprint, scope_of
from .aggregator import Aggregator
from .items import INT64_MAX, INT64_MIN, Batch, Keyed, Recorded, Request, Totals, Unkeyed
from .records import Applied
from .service import WriteBehind
from .statements import APPLY_BATCH_SQL
from .store import apply_batch

__all__ = [
    "APPLY_BATCH_SQL",
    "INT64_MAX",
    "INT64_MIN",
    "Accepted",
    "Aggregator",
    "Applied",
    "Batch",
    "Keyed",
    "NotApplied",
    "Recorded",
    "Request",
    "Totals",
    "Unkeyed",
    "WriteBehind",
    "apply_batch",
    "fingerprint",
    "scope_of",
]
