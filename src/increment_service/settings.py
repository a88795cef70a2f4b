"""Settings: one frozen dataclass, read from the environment once, at start-up."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"  # noqa: S104 -- a container's service must listen on every interface
    port: int = 3333
    # None means "start the embedded server under data_dir" (see embedded.py).
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path.home() / ".local" / "share" / "increment-service"
    workers: int = 1
    flush_interval_seconds: float = 2.0
    increment_auth: str = "none"
    max_pending_keys: int = 1_000_000
    session_max_age_seconds: int = 86_400
    session_idle_seconds: int = 1_800
    cookie_secure: bool = False
    # Proxies whose X-Forwarded-For is believed, for the per-address login limit (throttle.py).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    log_level: str = "INFO"
    log_format: str = "json"
    # Log one successful request in N (every other request always); 0 logs none. ACCESS_LOG is
    # true (1), false (0) or sample:N.
    access_log: int = 1
    # How long an Idempotency-Key is remembered (at least; at most twice as long). The same on
    # every replica: it is the width of the time buckets the keys are stored by.
    idempotency_ttl_seconds: int = 3600
    # How long a durable request (Prefer: durable) waits for its commit before a 503.
    durable_timeout_seconds: float = 5.0
    shutdown_timeout_seconds: float = 15.0
    auto_migrate: bool = True
    replica_id: str = dataclasses.field(default_factory=socket.gethostname)
    # OpenTelemetry's own variable: set, spans are exported there over OTLP/HTTP.
    otel_exporter_otlp_endpoint: str | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("PORT", 0 <= self.port <= 65535, "must be between 0 and 65535"),
            ("WORKERS", 1 <= self.workers <= 256, "must be between 1 and 256"),
            (
                "FLUSH_INTERVAL_SECONDS",
                0 < self.flush_interval_seconds < 10,
                "must be > 0 and < 10 (Postgres may lag at most 10 s)",
            ),
            (
                "INCREMENT_AUTH",
                self.increment_auth in ("none", "session", "token"),
                "must be none, session or token",
            ),
            ("MAX_PENDING_KEYS", self.max_pending_keys >= 1, "must be at least 1"),
            ("SESSION_MAX_AGE_SECONDS", self.session_max_age_seconds >= 1, "must be at least 1"),
            ("SESSION_IDLE_SECONDS", self.session_idle_seconds >= 1, "must be at least 1"),
            (
                "LOG_LEVEL",
                self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                "must be DEBUG, INFO, WARNING, ERROR or CRITICAL",
            ),
            ("LOG_FORMAT", self.log_format in ("json", "console"), "must be json or console"),
            ("ACCESS_LOG", self.access_log >= 0, "must be true, false or sample:N"),
            (
                "IDEMPOTENCY_TTL_SECONDS",
                60 <= self.idempotency_ttl_seconds <= 7 * 86_400,
                "must be between 60 and 604800 (a minute to a week)",
            ),
            (
                "DURABLE_TIMEOUT_SECONDS",
                0 < self.durable_timeout_seconds <= 60,
                "must be > 0 and at most 60",
            ),
            (
                "SHUTDOWN_TIMEOUT_SECONDS",
                self.shutdown_timeout_seconds >= self.durable_timeout_seconds + 2,
                "must exceed DURABLE_TIMEOUT_SECONDS by 2 s at least (SIGTERM answers every"
                " waiting durable request before the final flush)",
            ),
            ("REPLICA_ID", 0 < len(self.replica_id) <= 100, "must be 1 to 100 characters"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SettingsError(f"{name} {why}")

    # How SHUTDOWN_TIMEOUT_SECONDS is spent (docs/operations.md#shutdown). It is one budget,
    # from SIGTERM to the exit of the process that got it: a deadline fixed at the signal
    # (shutdown.Deadline) that every step consults, each keeping what the steps after it need.

    @property
    def request_drain_seconds(self) -> float:
        """At SIGTERM, how long in-flight requests may take to finish at most: a quarter of
        the budget, and never less than a durable request may wait for its commit (the
        worker's budget caps it: drain_seconds)."""
        return max(self.shutdown_timeout_seconds * 0.25, self.durable_timeout_seconds + 1)

    @property
    def shutdown_exit_seconds(self) -> float:
        """Kept at the end of a process's budget for it to exit once its last step is done
        (and, with WORKERS > 1, for the supervisor to reap it): a tenth, at most 1 s."""
        return min(1.0, self.shutdown_timeout_seconds * 0.1)

    @property
    def shutdown_close_seconds(self) -> float:
        """Kept after the write-behind's close for closing the clients: the Postgres pool
        (cut if it does not close in time), the session store, Redis, the spans' export."""
        return min(1.0, self.shutdown_timeout_seconds * 0.1)

    @property
    def embedded_stop_seconds(self) -> float:
        """Kept at the end of the budget for stopping the embedded servers, when they run."""
        return min(5.0, self.shutdown_timeout_seconds * 0.2)

    def worker_shutdown_seconds(self, *, embedded: bool) -> float:
        """A worker's budget, from the SIGTERM it gets: the whole budget, less what the process
        that got SIGTERM does after its workers have exited: stop the embedded servers, and,
        with WORKERS > 1, exit itself."""
        after = self.embedded_stop_seconds if embedded else 0.0
        if self.workers > 1:
            after += self.shutdown_exit_seconds
        return self.shutdown_timeout_seconds - after

    def drain_seconds(self, worker: float) -> float:
        """How long in-flight requests may take in a worker whose budget is ``worker`` s: the
        request drain, less what the write-behind's close, the clients and the exit keep."""
        kept = self.shutdown_close_seconds + self.shutdown_exit_seconds
        return max(0.0, min(self.request_drain_seconds, worker - kept))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); unset means default."""
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, Any] = {}

        def read(name: str, parse: Callable[[str], T]) -> None:
            raw = env.get(name)
            if raw is None or raw == "":
                return
            try:
                values[name.lower()] = parse(raw.strip())
            except ValueError:
                # URLs may carry a password: name the variable, never echo its value.
                shown = "" if name.endswith("_URL") else f" {raw!r}"
                raise SettingsError(f"{name} has an invalid value{shown}") from None

        read("HOST", str)
        read("PORT", int)
        read("DATABASE_URL", _url(("postgres", "postgresql")))
        read("REDIS_URL", _url(("redis", "rediss", "unix")))
        read("DATA_DIR", Path)
        read("WORKERS", int)
        read("FLUSH_INTERVAL_SECONDS", _finite_float)
        read("INCREMENT_AUTH", str.lower)
        read("MAX_PENDING_KEYS", int)
        read("SESSION_MAX_AGE_SECONDS", int)
        read("SESSION_IDLE_SECONDS", int)
        read("COOKIE_SECURE", _bool)
        read("TRUSTED_PROXIES", _networks)
        read("LOG_LEVEL", str.upper)
        read("LOG_FORMAT", str.lower)
        read("ACCESS_LOG", _access_log)
        read("IDEMPOTENCY_TTL_SECONDS", int)
        read("DURABLE_TIMEOUT_SECONDS", _finite_float)
        read("SHUTDOWN_TIMEOUT_SECONDS", _finite_float)
        read("AUTO_MIGRATE", _bool)
        read("REPLICA_ID", str)
        read("OTEL_EXPORTER_OTLP_ENDPOINT", _url(("http", "https")))
        if "data_dir" not in values and env.get("XDG_DATA_HOME"):
            values["data_dir"] = Path(env["XDG_DATA_HOME"]) / "increment-service"
        return dataclasses.replace(defaults, **values)


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _access_log(raw: str) -> int:
    """``true``/``false`` or ``sample:N``: log one request in N (0: none)."""
    kind, sep, every = raw.partition(":")
    if sep:
        if kind.lower() != "sample" or not every.isdigit() or int(every) < 1:
            raise ValueError(raw)
        return int(every)
    return 1 if _bool(raw) else 0


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated addresses or CIDR networks, e.g. ``10.0.0.0/8,127.0.0.1``."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip()
    )


def _finite_float(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(raw)
    return value


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        scheme, sep, _ = raw.partition("://")
        if not sep or scheme not in schemes:
            raise ValueError(raw)
        return raw

    return parse
