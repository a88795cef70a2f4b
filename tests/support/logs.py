"""JSON log lines: the service's (LOG_FORMAT=json) and nginx's access log."""

from __future__ import annotations

import contextlib
import json
from typing import Any


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a log (other lines skipped)."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events
