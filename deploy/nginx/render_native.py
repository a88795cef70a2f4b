"""Render deploy/nginx/native.conf.template for replicas on 127.0.0.1 ports.

Standard library only, so a test can load it by path without installing anything::

    spec = importlib.util.spec_from_file_location("render_native", PATH)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    text = module.render(prefix=tmp_dir, listen_port=8080, upstream_ports=[3401, 3402, 3403])

or from a shell::

    python deploy/nginx/render_native.py --prefix DIR --listen 8080 \\
        --upstream 3401 3402 3403 > DIR/nginx.conf
    nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

TEMPLATE = Path(__file__).with_name("native.conf.template")

# The same passive health-check parameters as `server app:3333 resolve ...` in
# nginx.conf; tests/test_deploy_nginx.py checks they agree.
SERVER_PARAMETERS = "max_fails=1 fail_timeout=5s"


def _port(value: int) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range: {value}")
    return port


def render(prefix: str | os.PathLike[str], listen_port: int, upstream_ports: Iterable[int]) -> str:
    """Return the nginx configuration text for the given prefix and ports."""
    prefix_path = Path(prefix)
    if not prefix_path.is_absolute():
        raise ValueError(f"prefix must be an absolute path: {prefix}")
    text = str(prefix_path)
    if any(ch.isspace() or ch in ";{}\"'" for ch in text):
        raise ValueError(f"prefix must not contain whitespace, quotes, braces or ';': {prefix}")
    ports = [_port(p) for p in upstream_ports]
    if not ports:
        raise ValueError("at least one upstream port is needed")
    servers = "\n".join(f"        server 127.0.0.1:{p} {SERVER_PARAMETERS};" for p in ports)
    return (
        TEMPLATE.read_text(encoding="utf-8")
        .replace("@@PREFIX@@", text)
        .replace("@@LISTEN_PORT@@", str(_port(listen_port)))
        .replace("@@UPSTREAM_SERVERS@@", servers)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="absolute directory for pid, logs, temp")
    parser.add_argument("--listen", required=True, type=int, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, type=int, nargs="+", help="replica ports")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.prefix, args.listen, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
