"""The container suite: the image and the compose stack, built and run by a real Docker engine.

Collected only by `tox -e containers` (TEST_BACKEND=containers): the other environments test
the same code without containers. Without a usable engine the suite skips, unless
CONTAINER_TESTS=required (CI sets it), where it fails instead. The images that
docker-compose.yml names come from tests/containers/images.sh (pulled, or stand-ins built from
Debian packages); the service's own image is built from this checkout at the start of the
session, through compose's `build` of `app`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.docker import (
    APP_IMAGE,
    ComposeStack,
    docker,
    engine_problem,
    missing_images,
    running_stack,
)

if os.environ.get("TEST_BACKEND") != "containers":
    collect_ignore_glob = ["test_*.py"]

REQUIRED = os.environ.get("CONTAINER_TESTS") == "required"
#: What a compose user would put in `.env` for the tests: a shorter flush interval (the
#: promise and every check stay the same, they just take less time).
COMPOSE_VARIABLES = {"FLUSH_INTERVAL_SECONDS": "1"}


@pytest.fixture(scope="session")
def engine() -> None:
    problem = engine_problem()
    if problem is not None:
        message = f"container tests need a Docker engine with compose v2: {problem}"
        if REQUIRED:
            pytest.fail(message + " (CONTAINER_TESTS=required)")
        pytest.skip(message)
    missing = missing_images()
    assert not missing, f"images missing: {missing}; run tests/containers/images.sh (as root)"


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="increment-containers-") as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def app_image(engine: None, workdir: Path) -> str:
    """The service's image, built from this checkout as `docker compose build` builds it."""
    before = docker("image", "inspect", "--format", "{{.Id}}", APP_IMAGE, check=False)
    ComposeStack(workdir, COMPOSE_VARIABLES).compose("build", "app", timeout=900)
    after = docker("image", "inspect", "--format", "{{.Id}}", APP_IMAGE).stdout.strip()
    old = before.stdout.strip()
    if before.returncode == 0 and old != after:
        docker("image", "rm", old, check=False)  # the previous run's build, now untagged
    return APP_IMAGE


@pytest.fixture(scope="session")
def stack(app_image: str, workdir: Path) -> Iterator[ComposeStack]:
    """One compose stack for the session's stack tests: each starts from three healthy
    replicas (the `restored` fixture) and uses keys of its own."""
    with running_stack(workdir, COMPOSE_VARIABLES) as running:
        yield running
