"""A clock of the test's own. For the client (client.py): its deadline and backoff are judged
by the waits it asks for, not by how long a busy machine took to run it. For code that takes a
clock (the aggregator's ``clock=``): the clock itself, moved by hand."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from increment_service import client as client_module


class FakeClock:
    """``time.monotonic`` and ``asyncio.sleep`` as the client module sees them: a sleep
    returns at once and moves the clock by exactly what was asked; nothing else moves it
    (an attempt takes no time). ``time.time`` stays the real one (HTTP dates)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    __call__ = monotonic

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
        fake_time = types.SimpleNamespace(monotonic=self.monotonic, time=time.time)
        monkeypatch.setattr(client_module, "time", fake_time)
        monkeypatch.setattr(client_module, "asyncio", types.SimpleNamespace(sleep=self.sleep))
        return self
