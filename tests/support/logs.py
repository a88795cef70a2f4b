"""JSON log lines: the service's (LOG_FORMAT=json) and nginx's access log."""

from __future__ import annotations

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
