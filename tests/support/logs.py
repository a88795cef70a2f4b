"""JSON log lines: the service's (LOG_FORMAT=json) and nginx's access log."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a log (other lines skipped). Only complete lines:
    the process may be writing the last one while a test reads."""
    return [
        json.loads(line)
        for line in text.splitlines(keepends=True)
        if line.startswith("{") and line.endswith("\n")
    ]


def log_wall(ts: object) -> float:
    """A log line's ``ts`` (ISO 8601, as the service writes it) in seconds since the epoch."""
    return dt.datetime.fromisoformat(str(ts)).timestamp()


def applied_flushes(text: str) -> list[dict[str, Any]]:
    """The service's ``flush`` events with outcome ``applied``, in the order of its log."""
    return [
        e
        for e in json_log_lines(text)
        if e.get("event") == "flush" and e.get("outcome") == "applied"
    ]


def applied_requests(text: str) -> int:
    """How many keys the batches this log says were applied held (``keys`` of each flush,
    each seq once, applied by its first try or found applied by a retry). With a distinct key
    per request and no keyed request, that is exactly how many requests the replica admitted
    up to the freeze of its last batch applied: all of them are in Postgres."""
    done = {
        int(e["seq"]): int(e["keys"])
        for e in json_log_lines(text)
        if e.get("event") == "flush" and e.get("outcome") in ("applied", "already-applied")
    }
    return sum(done.values())


def last_applied_freeze(text: str, before: float) -> float | None:
    """When the replica of this log froze the last batch it applied at or before wall time
    ``before`` (that flush's log time minus its duration): what it acknowledged after was not
    in that batch. None when it applied none by then."""
    flushes = [e for e in applied_flushes(text) if log_wall(e["ts"]) <= before]
    if not flushes:
        return None
    return log_wall(flushes[-1]["ts"]) - float(str(flushes[-1]["duration"]))
