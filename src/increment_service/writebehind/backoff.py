"""One backoff for every retry loop of the write-behind (the flusher, the durable committer,
the final flush): after the n-th failure in a row the next attempt waits ``first * 2**n``
seconds (0.2 s, 0.4 s, 0.8 s, ...), up to ``cap``. A recovered Postgres is caught up within one
cap of coming back."""

from __future__ import annotations

import asyncio
import dataclasses

#: The base of the doubling (the first retry waits twice this).
FIRST_BACKOFF_SECONDS = 0.1


@dataclasses.dataclass(slots=True)
class Backoff:
    cap: float
    first: float = FIRST_BACKOFF_SECONDS
    failures: int = 0  # in a row, since the last success

    def failed(self) -> float:
        """Count a failure; the wait before the next attempt."""
        self.failures += 1
        return self.delay()

    def delay(self, cap: float | None = None) -> float:
        """The wait before the next attempt, up to this backoff's cap (or ``cap``)."""
        return min(self.cap if cap is None else cap, self.first * 2.0**self.failures)

    def succeeded(self) -> None:
        self.failures = 0


def cancelling() -> bool:
    """Whether the running task is being cancelled. A retry loop must then stop, whatever
    error the cancellation turned into (a transaction's rollback on a connection the shutdown
    cut raises an InterfaceError instead of passing the CancelledError on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
