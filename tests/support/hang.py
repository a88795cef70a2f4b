"""A hung Postgres: every process of a test's own cluster stopped (SIGSTOP) for a while, then
continued (SIGCONT). Connections stay open and new ones are taken by the kernel, but nothing
answers: statements, connects and cancel requests all wait, as they do when a server hangs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from tests.support.postgres import PgCluster

T = TypeVar("T")


def postmaster_pid(pgdata: Path) -> int:
    """The postmaster's pid: the first line of ``postmaster.pid``."""
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the last ")" ends it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


async def hang_postgres(cluster: PgCluster, seconds: float, meanwhile: Awaitable[T]) -> T:
    """Stop the cluster's postmaster (first: it forks no backend after that) and every process
    it started; await ``meanwhile`` and at least ``seconds``; then continue them all. What
    ``meanwhile`` saw, it saw while Postgres was hung: returns its result."""
    postmaster = postmaster_pid(Path(cluster.server.pgdata))
    stopped = [postmaster]
    try:
        os.kill(postmaster, signal.SIGSTOP)
        for pid in children_of(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        assert len(stopped) > 1, "the postmaster had no process of its own"
        result, _ = await asyncio.gather(meanwhile, asyncio.sleep(seconds))
        return result
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
