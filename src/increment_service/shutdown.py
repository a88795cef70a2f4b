"""The shutdown budget: one deadline on the monotonic clock, fixed once when SIGTERM arrives,
that every step of the shutdown consults (how SHUTDOWN_TIMEOUT_SECONDS is split:
settings.ShutdownSplit, docs/operations.md#shutdown)."""

from __future__ import annotations

import time


class Deadline:
    """``seconds`` after the moment ``start()`` is first called."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def start(self) -> None:
        """Fix the deadline ``seconds`` from now; later calls change nothing (a second SIGTERM
        does not extend the budget)."""
        if self._at is None:
            self._at = time.monotonic() + self.seconds

    @property
    def started(self) -> bool:
        return self._at is not None

    def left(self, keep: float = 0.0) -> float:
        """Seconds until the deadline, less ``keep`` (kept for the steps that come after the
        one asking), and never below zero. A shutdown that no signal started (a test's app,
        an error at start-up) starts the deadline at its first question."""
        self.start()
        assert self._at is not None
        return max(0.0, self._at - keep - time.monotonic())
