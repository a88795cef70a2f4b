"""docker-compose.yml read, and interpolated the way compose does it.

The native topology (topology.py) runs compose's `app` with compose's own environment, and
the deploy checks (tests/test_deploy_*.py) validate the file with the same reading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

#: A compose variable reference: ``$$``, ``${VAR}``, ``${VAR<op>arg}`` or ``$VAR``.
COMPOSE_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def compose_interpolate(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR:+alt}`` and ``$$`` resolved as compose does, from ``variables``
    (what a user puts in ``.env`` or the shell)."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = variables.get(name)
        unset = not value if op.startswith(":") else value is None
        if op.endswith("+"):
            return "" if unset else arg
        if not unset:
            return value or ""
        if op.endswith("?"):
            raise ValueError(f"compose needs {name}: {arg}")
        return arg

    return COMPOSE_VARIABLE.sub(replace, text)


def compose_interpolate_all(node: Any, variables: Mapping[str, str]) -> Any:
    """Every string in a parsed compose file (or a part of it) interpolated."""
    if isinstance(node, str):
        return compose_interpolate(node, variables)
    if isinstance(node, dict):
        return {key: compose_interpolate_all(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [compose_interpolate_all(value, variables) for value in node]
    return node


def compose_file() -> dict[str, Any]:
    """docker-compose.yml, parsed (anchors and aliases resolved by PyYAML)."""
    import yaml  # PyPI pyyaml (the test extra), only when a test reads the file

    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _compose_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def compose_app_environment(variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment compose gives every replica of `app`, interpolated with ``variables``
    (unset ones take their ``${VAR:-default}``). A bare ``NAME`` entry takes ``variables``'s
    value and is left out when it has none, as compose does."""
    given = dict(variables or {})
    raw = compose_file()["services"]["app"].get("environment") or {}
    entries: dict[str, str | None] = {}
    if isinstance(raw, list):
        for entry in raw:
            key, sep, text = str(entry).partition("=")
            entries[key] = text if sep else None
    else:
        entries = {str(k): None if v is None else _compose_scalar(v) for k, v in raw.items()}
    environment: dict[str, str] = {}
    for name, value in entries.items():
        if value is None:
            if name in given:
                environment[name] = given[name]
        else:
            environment[name] = compose_interpolate(value, given)
    return environment


def compose_app_replicas() -> int:
    """How many replicas of `app` compose runs (``deploy.replicas``, 1 when unset)."""
    app = compose_file()["services"]["app"]
    return int((app.get("deploy") or {}).get("replicas", 1))
