"""The service's image on its own: the embedded default in one container, stopped and started
with its data in a volume, and the image run as deploy/k8s runs it (read-only root file system,
uid 10001, only DATA_DIR and /tmp writable) in both modes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.containers.docker import (
    ComposeStack,
    docker,
    inspect,
    unique_name,
    wait_until_serving,
)
from tests.support import lock
from tests.support.api import counter_via_api, signed_in
from tests.support.compose import REPO_ROOT
from tests.support.net import JSON, free_port
from tests.support.postgres import persisted

pytestmark = pytest.mark.timeout(300)

DATA_DIR = "/var/lib/increment-service"  # the image's and the ConfigMap's
#: `docker stop`'s own default: SIGKILL after 10 s. The embedded container must exit before.
DOCKER_STOP_SECONDS = 10


@contextlib.contextmanager
def container(image: str, *options: str, command: tuple[str, ...] = ()) -> Iterator[str]:
    """A detached container (removed afterwards, with the volumes named in ``options``)."""
    name = unique_name("app")
    docker("run", "--detach", "--name", name, *options, image, *command)
    try:
        yield name
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


def named_volumes(container_name: str) -> list[str]:
    mounts = inspect(container_name)["Mounts"]
    return [m["Name"] for m in mounts if m["Type"] == "volume"]


async def post_increments(url: str, key: str, count: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(base_url=url, headers=JSON) as session:
        for _ in range(count):
            async with session.post("/increment", json={"key": key, "value": 1}) as response:
                assert response.status == 202, await response.text()


@pytest.mark.parametrize(
    "entrypoint",
    [
        pytest.param((), id="tini"),
        # What the image did before tini, and what `docker run --entrypoint` still allows:
        # the service itself as PID 1, reaping its embedded servers.
        pytest.param(("--entrypoint", "increment-service"), id="service-as-pid-1"),
    ],
)
async def test_embedded_container_stops_cleanly_and_keeps_its_data(
    app_image: str, entrypoint: tuple[str, ...]
) -> None:
    port, volume = free_port(), unique_name("data")
    options = (
        *("--publish", f"127.0.0.1:{port}:3333"),
        *("--volume", f"{volume}:{DATA_DIR}"),
        *entrypoint,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with container(app_image, *options, command=("serve",)) as name:
            await asyncio.to_thread(wait_until_serving, name, url)
            cookie = await signed_in(url)
            await post_increments(url, "embedded", 25)
            sent = time.monotonic()
            await asyncio.to_thread(docker, "stop", name)  # docker's default: 10 s, then KILL
            took = time.monotonic() - sent
            state = inspect(name)["State"]
            assert state["ExitCode"] == 0, (state, docker("logs", name).stdout[-3000:])
            assert took < DOCKER_STOP_SECONDS, f"docker stop took {took:.1f}s"

            docker("start", name)
            await asyncio.to_thread(wait_until_serving, name, url)
            # The counter (embedded Postgres) and the session (embedded Redis) were kept.
            assert await counter_via_api(url, "embedded", cookie) == 25
            logs = docker("logs", name).stdout
            assert logs.count('"msg":"embedded servers started"') == 2
            assert '"level":"error"' not in logs
    finally:
        docker("volume", "rm", "--force", volume, check=False)
    print(f"\nembedded container ({entrypoint or 'tini'}): docker stop took {took:.2f}s, exit 0")


# --- the image as Kubernetes runs it ---------------------------------------------------------


def k8s_manifest(name: str) -> Any:
    import yaml

    return yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / name).read_text(encoding="utf-8"))


def k8s_run_options() -> list[str]:
    """`docker run` options for deploy/k8s/deployment.yaml's pod and container security
    contexts and volumes, and the ConfigMap's settings as the environment."""
    pod = k8s_manifest("deployment.yaml")["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    pod_security, security = pod["securityContext"], app["securityContext"]
    options = ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    options += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in app["volumeMounts"]:
        assert "emptyDir" in volumes[mount["name"]], "only emptyDir volumes are mapped"
        # An emptyDir belongs to the pod's fsGroup; Docker's tmpfs takes an owner instead.
        owner = f"uid={pod_security['runAsUser']},gid={pod_security['fsGroup']}"
        options += ["--tmpfs", f"{mount['mountPath']}:{owner}"]
    for key, value in k8s_manifest("configmap.yaml")["data"].items():
        options += ["--env", f"{key}={value}"]
    return options


def test_k8s_run_options_follow_the_manifest() -> None:
    options = k8s_run_options()
    assert options[:2] == ["--user", "10001:10001"]
    assert "--read-only" in options
    assert "--cap-drop=ALL" in options
    writable = [options[i + 1] for i, o in enumerate(options) if o == "--tmpfs"]
    assert writable == [f"{path}:uid=10001,gid=10001" for path in ("/tmp", DATA_DIR)]


async def test_image_runs_read_only_as_kubernetes_runs_it_embedded(app_image: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = (*k8s_run_options(), "--publish", f"127.0.0.1:{port}:3333")
    with container(app_image, *options, command=("serve",)) as name:
        await asyncio.to_thread(wait_until_serving, name, url)
        cookie = await signed_in(url)
        await post_increments(url, "read-only", 3)

        async def persisted_3() -> bool:
            with contextlib.suppress(AssertionError):
                return await counter_via_api(url, "read-only", cookie) == 3
            return False

        deadline = time.monotonic() + 15
        while not await persisted_3():
            assert time.monotonic() < deadline, "not persisted within 15 s"
            await asyncio.sleep(0.5)
        assert inspect(name)["HostConfig"]["ReadonlyRootfs"] is True
        assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
        assert (
            "Read-only file system"
            in docker("exec", name, "touch", "/opt/venv/written", check=False).stderr
        )
        docker("stop", name)
        assert inspect(name)["State"]["ExitCode"] == 0, docker("logs", name).stdout[-3000:]


async def test_image_runs_read_only_as_kubernetes_runs_it_external(
    app_image: str, stack: ComposeStack
) -> None:
    """Against the compose stack's Postgres and Redis, on its network, as a pod would use a
    managed Postgres and Redis."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = (
        *k8s_run_options(),
        *("--publish", f"127.0.0.1:{port}:3333", "--network", stack.network),
        *("--env", "DATABASE_URL=postgresql://increment:increment@postgres:5432/increment"),
        *("--env", "REDIS_URL=redis://redis:6379/0", "--env", "REPLICA_ID=k8s-like"),
    )
    with container(app_image, *options, command=("serve",)) as name:
        await asyncio.to_thread(wait_until_serving, name, url)
        await signed_in(url)  # Redis works from here too
        key = unique_name("external")
        await post_increments(url, key, 4)
        docker("stop", name)  # final flush
        assert inspect(name)["State"]["ExitCode"] == 0, docker("logs", name).stdout[-3000:]
    assert (await persisted(stack.database_url)).get(key) == 4


def test_image_size_is_reported(app_image: str) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", app_image).stdout)
    base = docker("image", "inspect", "--format", "{{.Size}}", "python:3.11-slim").stdout
    assert size < 1_000_000_000, f"the image grew to {size / 1e6:.0f} MB"
    print(f"\nimage {app_image}: {size / 1e6:.0f} MB, of which the base {int(base) / 1e6:.0f} MB")


def test_image_venv_holds_exactly_the_locked_versions(app_image: str) -> None:
    """The image's virtual environment is the lock's runtime and tracing export: every installed
    distribution at its locked version, nothing else but the project itself and pip."""
    listing = docker(
        "run",
        "--rm",
        "--entrypoint",
        "python",
        app_image,
        "-c",
        "import importlib.metadata as m\n"
        "for d in m.distributions(): print(d.metadata['Name'], d.version)",
    ).stdout
    installed = {}
    for line in listing.splitlines():
        name, version = line.split()
        installed[lock.normalize(name)] = version
    assert lock.differences(lock.pins(lock.LOCK), installed) == []
    # ...and it is the whole export: nothing the image should have is missing.
    assert lock.pins(lock.IMAGE).items() <= installed.items()
    assert "increment-service" in installed
