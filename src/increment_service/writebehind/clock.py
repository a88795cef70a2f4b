"""Postgres's clock, as the write-behind's statements last saw it: whether a statement starts
near an idempotency bucket boundary, where keys must be locked before they are claimed
(store.py), can be told before asking Postgres."""

from __future__ import annotations

import time

#: Around a bucket boundary, how far on either side a statement may run beside one of the
#: other bucket (whose keys it cannot see in the other partition): more than the pool's
#: statement_timeout (db.py). Statements that start that close to a boundary take the
#: advisory locks of their keys first.
BOUNDARY_SECONDS = 60
#: How far this process's clock may move against Postgres's between two statements, for the
#: decision to skip the lock statement away from a boundary (Postgres's own test decides near
#: one).
_CLOCK_MARGIN_SECONDS = 30.0


class PostgresClock:
    """Postgres's clock as this process last saw it (its offset to ``time.time()``), to tell
    whether a statement starts near a bucket boundary before asking Postgres."""

    def __init__(self) -> None:
        self.offset: float | None = None

    def saw(self, postgres_now: float) -> None:
        self.offset = postgres_now - time.time()

    def far_from_a_boundary(self, ttl: float) -> bool:
        """Surely more than BOUNDARY_SECONDS from one (unknown: not surely)."""
        if self.offset is None:
            return False
        into = (time.time() + self.offset) % ttl
        near = BOUNDARY_SECONDS + _CLOCK_MARGIN_SECONDS
        return near < into < ttl - near
