"""``eventually``: poll a condition until it holds, fail naming it at the deadline."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    what: str,
    within: float = 15.0,
    every: float = 0.05,
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` at the deadline.

    An ``async def`` check is awaited; a plain one runs in a thread, since it may block
    (a scrape, a subprocess) and the event loop may be driving traffic meanwhile."""
    deadline = time.monotonic() + within
    while True:
        if inspect.iscoroutinefunction(check):
            held = await check()
        else:
            held = await asyncio.to_thread(check)
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(every)
