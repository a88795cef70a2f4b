"""Every setting the service documents, with its default, and the service's Settings class
(which the deploy checks hold the compose file, .env.example and deploy/k8s against)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import pytest

from tests.support.compose import REPO_ROOT

# Every setting the service documents (SPEC.md "Running", the README's settings table,
# src/increment_service/settings.py), with its default as .env.example writes it.
# None: no fixed default (unset means "embedded server", or "the hostname").
SERVICE_SETTINGS: dict[str, str | None] = {
    "HOST": "0.0.0.0",
    "PORT": "3333",
    "DATABASE_URL": None,
    "REDIS_URL": None,
    "DATA_DIR": None,
    "WORKERS": "1",
    "FLUSH_INTERVAL_SECONDS": "2",
    "INCREMENT_AUTH": "none",
    "MAX_PENDING_KEYS": "1000000",
    "SESSION_MAX_AGE_SECONDS": "86400",
    "SESSION_IDLE_SECONDS": "1800",
    "COOKIE_SECURE": "false",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "json",
    "ACCESS_LOG": "true",
    "IDEMPOTENCY_TTL_SECONDS": "3600",
    "DURABLE_TIMEOUT_SECONDS": "5",
    "SHUTDOWN_TIMEOUT_SECONDS": "15",
    "AUTO_MIGRATE": "true",
    "REPLICA_ID": None,
    "OTEL_EXPORTER_OTLP_ENDPOINT": None,
    "TRUSTED_PROXIES": None,
}


def settings_class() -> Any:
    """increment_service.settings.Settings (skips until it can be imported)."""
    try:
        module = importlib.import_module("increment_service.settings")
    except ImportError:
        path = REPO_ROOT / "src" / "increment_service" / "settings.py"
        if not path.is_file():
            pytest.skip("src/increment_service/settings.py does not exist yet")
        name = "_deploy_test_increment_service_settings"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:  # a relative import, say: only the package can load it
            sys.modules.pop(name, None)
            pytest.skip(f"settings.py cannot be loaded on its own: {exc!r}")
    settings = getattr(module, "Settings", None)
    if settings is None or not hasattr(settings, "from_env"):
        pytest.skip("increment_service.settings has no Settings.from_env")
    return settings
