"""nginx with deploy/nginx/native.conf.template: the load balancer of the native topology."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.compose import REPO_ROOT
from tests.support.logs import json_log_lines
from tests.support.net import free_port
from tests.support.processes import wait_until_listening

NGINX_DIR = REPO_ROOT / "deploy" / "nginx"
NGINX_COMPOSE = NGINX_DIR / "nginx.conf"
NGINX_NATIVE_TEMPLATE = NGINX_DIR / "native.conf.template"
NGINX_RENDER_SCRIPT = NGINX_DIR / "render_native.py"


def last_upstream(entry: Mapping[str, Any]) -> str:
    """The address ("host:port") of the replica that gave nginx's final answer in one entry of
    the JSON access log of deploy/nginx: `$upstream_addr` lists every replica tried, ', '
    between tries; "" when nginx answered by itself."""
    return str(entry.get("upstream_addr", "")).replace(" : ", ", ").split(", ")[-1]


def render_native_nginx(prefix: Path, listen_port: int, upstream_ports: Sequence[int]) -> str:
    """deploy/nginx/native.conf.template rendered by deploy/nginx/render_native.py."""
    spec = importlib.util.spec_from_file_location("render_native", NGINX_RENDER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.render(
        prefix=prefix, listen_port=listen_port, upstream_ports=list(upstream_ports)
    )
    assert "@@" not in text, "a placeholder was left unrendered"
    return text


def nginx_binary() -> str | None:
    """The nginx executable (the Debian package installs it in /usr/sbin)."""
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
        wait_until_listening(self.process, self.port, timeout, "nginx", self.log)
        return self

    def stop(self, timeout: float = 10.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
