"""The Docker engine and docker compose, driven through their command-line clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.compose import COMPOSE_FILE, REPO_ROOT
from tests.support.logs import json_log_lines
from tests.support.net import free_port, wait_until_healthy
from tests.support.nginx import last_upstream

#: Images docker-compose.yml and the Dockerfile name, besides the service's own (made by
#: tests/containers/images.sh when no registry has them).
THIRD_PARTY_IMAGES = (
    "python:3.11-slim",
    "postgres:16-alpine",
    "redis:7-alpine",
    "nginx:1.27.5-alpine",
    "prom/prometheus:v3.5.0",
)
#: The service's image as the tests build it (compose's `app` build, tagged).
APP_IMAGE = "increment-service:test"
#: Every test resource is named with this prefix and a random part, and removed afterwards.
PREFIX = "incr-test"


def unique_name(kind: str) -> str:
    return f"{PREFIX}-{kind}-{uuid.uuid4().hex[:8]}"


def docker(
    *args: str, check: bool = True, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker") or "docker"
    result = subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def engine_problem() -> str | None:
    """Why no Docker engine with compose v2 can be used here, or None."""
    if shutil.which("docker") is None:
        return "no docker client"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
        if info.returncode != 0:
            return f"no Docker engine: {info.stderr.strip()}"
        compose = docker("compose", "version", "--short", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    if compose.returncode != 0 or compose.stdout.strip().split(".")[0] not in {"2", "v2"}:
        return "no docker compose v2"
    return None


def missing_images(names: Sequence[str] = THIRD_PARTY_IMAGES) -> list[str]:
    return [name for name in names if docker("image", "inspect", name, check=False).returncode]


def inspect(container: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", container).stdout)
    return data[0]


def container_ip(container: str, network: str) -> str:
    """The container's address on the compose network ``network`` (``proxy``: where nginx
    reaches the replicas; ``default``: where Prometheus scrapes them)."""
    networks = inspect(container)["NetworkSettings"]["Networks"]
    (address,) = {
        n["IPAddress"]
        for name, n in networks.items()
        if n["IPAddress"] and name.endswith(f"_{network}")
    }
    return str(address)


class ComposeStack:
    """docker-compose.yml as users run it, under a project name of its own, with an override
    file that only publishes the ports the tests use on free loopback ports, names the `app`
    image and keeps Grafana (no image anywhere reachable) out through a profile.

    ``variables`` play the role of the user's `.env` (compose interpolates them)."""

    def __init__(self, directory: Path, variables: Mapping[str, str]) -> None:
        self.project = unique_name("stack")
        self.variables = dict(variables)
        self.lb_port, self.postgres_port, self.prometheus_port = (free_port() for _ in range(3))
        self.override = directory / "docker-compose.override.yml"
        self.override.write_text(
            "services:\n"
            f"  app:\n    image: {APP_IMAGE}\n"
            f"  lb:\n    ports: !override\n      - 127.0.0.1:{self.lb_port}:3333\n"
            f"  postgres:\n    ports:\n      - 127.0.0.1:{self.postgres_port}:5432\n"
            "  prometheus:\n    ports: !override\n"
            f"      - 127.0.0.1:{self.prometheus_port}:9090\n"
            '  grafana:\n    profiles: ["grafana"]\n',
            encoding="utf-8",
        )

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def database_url(self) -> str:
        user = self.variables.get("POSTGRES_USER", "increment")
        password = self.variables.get("POSTGRES_PASSWORD", "increment")
        database = self.variables.get("POSTGRES_DB", "increment")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.postgres_port}/{database}"

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    def compose(self, *args: str, check: bool = True, timeout: float = 300.0) -> str:
        result = docker(
            "compose",
            "--project-name",
            self.project,
            "--project-directory",
            str(REPO_ROOT),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override),
            *args,
            check=check,
            timeout=timeout,
            env=self.variables,
        )
        return result.stdout

    def up(self, *args: str) -> None:
        self.compose("up", "--detach", "--wait", "--wait-timeout", "180", *args)

    def down(self, *args: str) -> None:
        self.compose("down", "--remove-orphans", *args)

    def containers(self, service: str) -> list[str]:
        """Ids of the service's running containers."""
        return self.compose("ps", "--quiet", "--status", "running", service).split()

    def logs(self, service: str = "") -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", *[s for s in [service] if s])

    def lb_answered_by(self) -> dict[str, str]:
        """request id -> IP address of the replica that gave nginx's final answer, from the
        lb's JSON access log."""
        answered = {}
        for entry in json_log_lines(self.logs("lb")):
            last = last_upstream(entry)
            if "request_id" in entry and last:
                answered[str(entry["request_id"])] = last.rsplit(":", 1)[0]
        return answered


@contextlib.contextmanager
def running_stack(directory: Path, variables: Mapping[str, str]) -> Iterator[ComposeStack]:
    stack = ComposeStack(directory, variables)
    try:
        stack.up()
        yield stack
    finally:
        stack.down("--volumes", "--timeout", "30")


def wait_until_serving(container: str, url: str, timeout: float = 120.0) -> None:
    """wait_until_healthy, failing at once (with the logs) if the container stops."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_until_healthy(url, timeout=2.0)
            return
        except RuntimeError as error:
            state = inspect(container)["State"]
            if not state["Running"] or time.monotonic() > deadline:
                logs = docker("logs", container).stdout + docker("logs", container).stderr
                raise AssertionError(
                    f"{container} is not serving ({state['Status']}, exit {state['ExitCode']}):"
                    f" {error}\n{logs[-3000:]}"
                ) from None
