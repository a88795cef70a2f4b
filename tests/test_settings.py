"""Settings from the environment; a bad value stops start-up with one line naming it."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from increment_service.cli import main
from increment_service.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.workers) == ("0.0.0.0", 3333, 1)
    assert s.database_url is None
    assert s.redis_url is None
    assert s.flush_interval_seconds == 2.0
    assert s.increment_auth == "none"
    assert s.log_format == "json"
    assert s.auto_migrate
    assert s.access_log
    assert not s.cookie_secure


def test_every_setting_is_read() -> None:
    s = Settings.from_env(
        {
            "HOST": "127.0.0.1",
            "PORT": "8080",
            "DATABASE_URL": "postgresql://u@db/x",
            "REDIS_URL": "redis://r:6379/0",
            "DATA_DIR": "/srv/inc",
            "WORKERS": "4",
            "FLUSH_INTERVAL_SECONDS": "0.5",
            "INCREMENT_AUTH": "SESSION",
            "MAX_PENDING_KEYS": "10",
            "SESSION_MAX_AGE_SECONDS": "60",
            "SESSION_IDLE_SECONDS": "30",
            "COOKIE_SECURE": "yes",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "console",
            "ACCESS_LOG": "off",
            "DURABLE_TIMEOUT_SECONDS": "1",
            "SHUTDOWN_TIMEOUT_SECONDS": "3",
            "AUTO_MIGRATE": "false",
            "REPLICA_ID": "pod-1",
            "TRUSTED_PROXIES": "10.0.0.0/8, ::1",
            "IDEMPOTENCY_TTL_SECONDS": "120",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        }
    )
    assert s == Settings(
        host="127.0.0.1",
        port=8080,
        database_url="postgresql://u@db/x",
        redis_url="redis://r:6379/0",
        data_dir=Path("/srv/inc"),
        workers=4,
        flush_interval_seconds=0.5,
        increment_auth="session",
        max_pending_keys=10,
        session_max_age_seconds=60,
        session_idle_seconds=30,
        cookie_secure=True,
        log_level="DEBUG",
        log_format="console",
        access_log=False,
        durable_timeout_seconds=1.0,
        shutdown_timeout_seconds=3.0,
        auto_migrate=False,
        replica_id="pod-1",
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        idempotency_ttl_seconds=120,
        otel_exporter_otlp_endpoint="http://collector:4318",
    )
    # Every field of Settings was given a value other than its default above.
    defaults = Settings()
    assert all(
        getattr(s, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(Settings)
    )


@pytest.mark.parametrize(
    ("raw", "every"),
    [("true", 1), ("off", 0), ("sample:1", 1), ("SAMPLE:100", 100)],
)
def test_access_log_is_on_off_or_sampled(raw: str, every: int) -> None:
    assert Settings.from_env({"ACCESS_LOG": raw}).access_log == every


def test_xdg_data_home_places_the_data_dir() -> None:
    assert Settings.from_env({"XDG_DATA_HOME": "/x"}).data_dir == Path("/x/increment-service")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("FLUSH_INTERVAL_SECONDS", "10"),
        ("FLUSH_INTERVAL_SECONDS", "0"),
        ("FLUSH_INTERVAL_SECONDS", "nan"),
        ("INCREMENT_AUTH", "basic"),
        ("MAX_PENDING_KEYS", "0"),
        ("SESSION_MAX_AGE_SECONDS", "0"),
        ("SESSION_IDLE_SECONDS", "-1"),
        ("COOKIE_SECURE", "maybe"),
        ("LOG_LEVEL", "chatty"),
        ("LOG_FORMAT", "xml"),
        ("ACCESS_LOG", "2"),
        ("ACCESS_LOG", "sample:0"),
        ("ACCESS_LOG", "sample:"),
        ("ACCESS_LOG", "every:3"),
        ("SHUTDOWN_TIMEOUT_SECONDS", "0"),
        ("AUTO_MIGRATE", "sometimes"),
        ("REPLICA_ID", "r" * 101),
        ("DATABASE_URL", "mysql://u:secret@db/x"),
        ("REDIS_URL", "localhost:6379"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name} "):
        Settings.from_env({name: value})


def test_a_bad_url_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"DATABASE_URL": "mysql://u:secret@db/x"})
    assert "secret" not in str(info.value)


def test_start_up_stops_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "increment_service"],
        env={"PATH": "/usr/bin:/bin", "WORKERS": "lots", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "increment-service: configuration error: WORKERS has an invalid value 'lots'"
    ]


def test_command_line_options_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORKERS", "2")
    # An invalid override is reported like an invalid environment value.
    assert main(["serve", "--workers", "0"]) == 2
    assert "WORKERS must be between 1 and 256" in capsys.readouterr().err


def test_migrate_command_applies_the_schema(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # migrate never needs Redis
    assert main(["migrate"]) == 0


@pytest.mark.parametrize("value", ["none", "session", "token", "Token"])
def test_increment_auth_takes_none_session_or_token(value: str) -> None:
    assert Settings.from_env({"INCREMENT_AUTH": value}).increment_auth == value.lower()
