"""compose's stack without Docker: the replicas of compose's `app` service as
`increment-service` processes on loopback ports (each with its own REPLICA_ID), nginx with
deploy/nginx/native.conf.template in front on a free port, one Postgres and one Redis. The
replicas' environment is compose's `app` environment, interpolated the way compose does it,
with only the settings that cannot be the same outside Docker replaced (NATIVE_OVERRIDES).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.support.compose import compose_app_environment, compose_app_replicas
from tests.support.net import free_port, wait_until_healthy
from tests.support.nginx import NginxProcess
from tests.support.processes import ServiceProcess

#: Settings of compose's `app` that must differ natively: the listening address and port (one
#: loopback port per replica instead of app:3333 in each container), the URLs (compose's
#: `postgres`/`redis` host names exist only on the compose network), the data directory (a
#: container path) and REPLICA_ID (compose leaves it to the container's host name, unique per
#: container but the same for every process on one machine; batch ids stay unique anyway, the
#: service adds a random suffix per start, but replicas are told apart by it in logs and
#: applied_batches).
NATIVE_OVERRIDES = frozenset(
    {"HOST", "PORT", "DATABASE_URL", "REDIS_URL", "DATA_DIR", "REPLICA_ID"}
)

#: Compose services the native topology leaves out (no Prometheus/Grafana natively).
NATIVE_OUT_OF_SCOPE = frozenset({"prometheus", "grafana"})


class NativeTopology:
    """compose's stack on this machine: `app` replicas as processes, nginx as `lb`, and the
    given Postgres and Redis standing in for compose's `postgres` and `redis`.

    ``variables`` play the role of compose's ``.env``: they go through the same
    ``${VAR:-default}`` interpolation as docker-compose.yml, so a setting the tests tune
    (FLUSH_INTERVAL_SECONDS) is tuned the way a compose user would tune it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        database_url: str,
        redis_url: str,
        variables: Mapping[str, str] | None = None,
        replicas: int | None = None,
    ) -> None:
        self.directory = directory
        self.database_url = database_url
        self.redis_url = redis_url
        self.compose_environment = compose_app_environment(variables)
        count = compose_app_replicas() if replicas is None else replicas
        self.replica_ids = [f"replica-{n}" for n in range(1, count + 1)]
        self.environments = [self.replica_environment(rid, free_port()) for rid in self.replica_ids]
        self.replicas = [
            ServiceProcess(env, directory / f"{rid}.log", port=int(env["PORT"]))
            for rid, env in zip(self.replica_ids, self.environments, strict=True)
        ]
        self.lb = NginxProcess(directory / "lb", [r.port for r in self.replicas])

    def replica_environment(self, replica_id: str, port: int) -> dict[str, str]:
        """compose's `app` environment with only NATIVE_OVERRIDES replaced."""
        data_dir = self.directory / replica_id / "data"
        native = {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "DATA_DIR": str(data_dir),
            "REPLICA_ID": replica_id,
        }
        assert set(native) == NATIVE_OVERRIDES
        return {**self.compose_environment, **native}

    def roles(self) -> dict[str, int]:
        """compose service name -> how many of it run natively."""
        return {"lb": 1, "app": len(self.replicas), "postgres": 1, "redis": 1}

    @property
    def url(self) -> str:
        return self.lb.url

    def start(self, timeout: float = 60.0) -> NativeTopology:
        """compose's order: the replicas (Postgres and Redis are already up) until each is
        healthy, then the load balancer."""
        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.replicas)) as pool:
                list(pool.map(lambda r: self.start_replica(r, timeout), self.replicas))
            self.lb.start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_replica(self, replica: ServiceProcess, timeout: float = 60.0) -> None:
        """Start (or restart, on the same port) one replica and wait until it is healthy."""
        (self.directory / f"{replica.env['REPLICA_ID']}" / "data").mkdir(
            parents=True, exist_ok=True
        )
        replica.start(timeout)
        wait_until_healthy(replica.url, timeout)

    def stop(self) -> None:
        """The load balancer first, then every replica (SIGTERM: final flush)."""
        self.lb.stop()
        for replica in self.replicas:
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.stop()

    def __enter__(self) -> NativeTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
