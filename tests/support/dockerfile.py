"""The Dockerfile read as its instructions, stage by stage, and .dockerignore's patterns."""

from __future__ import annotations

import json

from tests.support.compose import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def dockerfile_instructions() -> list[list[tuple[str, str]]]:
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


def exec_form(argument: str) -> list[str]:
    """An instruction's JSON (exec form) argument, e.g. CMD ["serve"]: its strings."""
    value = json.loads(argument)
    assert isinstance(value, list), f"not exec form: {argument}"
    assert all(isinstance(item, str) for item in value)
    return value


def dockerfile_has_healthcheck() -> bool:
    """Whether the image (the Dockerfile's last stage) has a HEALTHCHECK."""
    return any(name == "HEALTHCHECK" for name, _ in dockerfile_instructions()[-1])


def dockerfile_healthcheck_command() -> list[str]:
    """The command of the image's HEALTHCHECK (its exec form after CMD)."""
    healthcheck = next(arg for name, arg in dockerfile_instructions()[-1] if name == "HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    return exec_form(command)
