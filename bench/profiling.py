"""py-spy profiles of the servers a scenario drives (``python -m bench.run --profile``): one
``py-spy record`` per worker process for the scenario's length, then a summary of the
collapsed stacks: self and inclusive time per function, self time per package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.config import Config
from bench.servers import Server


def start_profilers(
    config: Config, server: Server, name: str, seconds: int
) -> list[subprocess.Popen[bytes]]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    profiles = config.out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    processes = []
    for pid in server.worker_pids():
        output = profiles / f"{name}-{pid}.txt"
        command = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds)]
        command += ["--rate", "200", "--nonblocking", "--format", "raw", "-o", str(output)]
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return processes


#: Where a frame's code lives, by a fragment of the frame (function and file); the first that
#: matches. py-spy sees Python frames only: C code counts for the Python frame that called it,
#: so uvloop's own work (polling, reading sockets, callbacks) shows as aiohttp's ``run_app``,
#: and the send system call of each answer as ``StreamWriter._write``.
PACKAGES = (
    ("run_app (aiohttp/web.py", "event loop (uvloop's C code under run_app)"),
    ("_write (aiohttp/http_writer.py", "socket send (aiohttp's transport.write)"),
    ("increment_service", "increment_service"),
    ("aiohttp_session", "aiohttp_session"),
    ("aiohttp", "aiohttp"),
    ("multidict", "multidict/yarl/propcache"),
    ("yarl", "multidict/yarl/propcache"),
    ("propcache", "multidict/yarl/propcache"),
    ("prometheus_client", "prometheus_client"),
    ("redis", "redis"),
    ("asyncpg", "asyncpg"),
    ("asyncio", "asyncio/uvloop"),
    ("uvloop", "asyncio/uvloop"),
    ("logging", "logging"),
)
#: The frames of the bench's reference servers count as their "service".
OWN_CODE = ("increment_service", "bench/bare.py", "bench/ceiling.py", "bench/minimal.py")


def package_of(frame: str) -> str:
    """The package of a py-spy frame ``function (path/file.py:line)``."""
    for fragment, package in PACKAGES:
        if fragment in frame:
            return package
    return "other (stdlib, ...)"


def runs_own_code(frames: list[str]) -> bool:
    """Whether a stack runs the server's own code: below run_app (the command that starts
    the server is its own code too, at the root of every stack the loop runs)."""
    below = next((i + 1 for i, f in enumerate(frames) if f.startswith("run_app (")), 0)
    return any(fragment in frame for frame in frames[below:] for fragment in OWN_CODE)


def summarize_profile(paths: list[Path], top: int = 25) -> str:
    """Self and inclusive time per function from py-spy's collapsed stacks, and self time per
    package (time in C code, orjson's say, counts for the Python frame that called it)."""
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    packages: dict[str, int] = {}
    own = 0  # samples with a frame of the server's own code anywhere on the stack
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            self_time[frames[-1]] = self_time.get(frames[-1], 0) + count
            package = package_of(frames[-1])
            packages[package] = packages.get(package, 0) + count
            if runs_own_code(frames):
                own += count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "no samples\n"
    lines = [
        f"{total} samples\n",
        f"{100 * own / total:5.1f}%  in the server's own code or what it calls (inclusive)\n",
        "## self time per package\n",
    ]
    for package, count in sorted(packages.items(), key=lambda x: -x[1]):
        lines.append(f"{100 * count / total:5.1f}%  {package}")
    lines.append("\n## self time\n")
    for frame, count in sorted(self_time.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    lines.append("\n## inclusive time\n")
    for frame, count in sorted(inclusive.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


def finish_profiles(config: Config, name: str, profilers: list[subprocess.Popen[bytes]]) -> str:
    """Wait for the profilers of scenario ``name`` and write the summary of their stacks:
    its path, relative to the run's output directory."""
    for profiler in profilers:
        profiler.wait(timeout=60)
    paths = sorted((config.out / "profiles").glob(f"{name}-*.txt"))
    summary = config.out / "profiles" / f"{name}.summary.txt"
    summary.write_text(summarize_profile(paths))
    return str(summary.relative_to(config.out))
