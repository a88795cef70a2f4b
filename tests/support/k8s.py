"""deploy/k8s, a kustomize base: its manifests as YAML documents, and the app's container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.compose import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
K8S_SECRET_EXAMPLE = "secret.example.yaml"


def yaml_module() -> Any:
    """PyYAML (the test extra's pyyaml); a check that needs it skips without it."""
    return pytest.importorskip("yaml", reason="PyPI package pyyaml is needed to parse YAML")


def k8s_documents(path: Path) -> list[dict[str, Any]]:
    """The documents of one manifest file, each with apiVersion, kind and a named metadata."""
    documents = [d for d in yaml_module().safe_load_all(path.read_text(encoding="utf-8")) if d]
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
        assert document["metadata"].get("name"), path.name
    return documents


def kustomization() -> dict[str, Any]:
    data = yaml_module().safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data["kind"] == "Kustomization"
    return data


def k8s_resources() -> list[dict[str, Any]]:
    """Every document of the resources kustomization.yaml lists."""
    return [
        document
        for name in kustomization()["resources"]
        for document in k8s_documents(K8S_DIR / name)
    ]


def k8s_document(kind: str) -> dict[str, Any]:
    """The one resource of ``kind`` (fails unless there is exactly one)."""
    matches = [d for d in k8s_resources() if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def app_container() -> dict[str, Any]:
    """The Deployment's one container."""
    containers = k8s_document("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container
