"""The lock: one resolution of every Python package that tox, CI, the image and bench/ install.

    python requirements/lock.py compile [uv options]   # tox -e lock: refresh the lock, then export
    python requirements/lock.py check                  # this interpreter's packages are the lock's
    python requirements/lock.py diff                   # print where they differ; never fails
    python requirements/lock.py oldest FILE            # tox -e oldest: the ranges' lower bounds

`lock.txt` is the resolution, with hashes, made by `uv pip compile` from setup.cfg (the
package's ranges, every extra), tools.in (what tox and CI add) and bench/requirements.txt. The
exports are made from it in the same run: `constraints.txt` (every pin, no hashes: pip takes a
hashed constraints file as require-hashes mode, which the project's own wheel cannot pass; tox
and .ci/run use it), `image.txt` (runtime and the tracing extra, hashed) and `build.txt`
(setuptools and wheel, hashed) for the image. docs/dependencies.md says why and how.

`check` and `diff` use only the standard library: they run under any environment's Python.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = HERE / "lock.txt"
CONSTRAINTS = HERE / "constraints.txt"
IMAGE = HERE / "image.txt"
BUILD = HERE / "build.txt"

# The target every export is resolved for: CPython 3.11 on Linux x86_64 (glibc, as Debian and
# python:3.11-slim are).
TARGET = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28")
# Written into each file's header instead of the command line, which names temporary paths.
HEADER = "--custom-compile-command"

# Installed but never locked: the project itself, and the pip that made the environment.
UNLOCKED = frozenset({"increment-service", "pip"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503's normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """The `name==version` lines of a requirements file, by normalized name."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            found[normalize(match[1])] = match[2]
    return found


def installed() -> dict[str, str]:
    """The distributions this interpreter sees, by normalized name."""
    return {
        normalize(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }


def differences(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per installed package that the lock does not pin to its version."""
    lines = []
    for name, version in sorted(have.items()):
        if name in UNLOCKED:
            continue
        want = locked.get(name)
        if want is None:
            lines.append(f"{name}=={version}: not in the lock")
        elif want != version:
            lines.append(f"{name}=={version}: the lock has {want}")
    return lines


def uv(*args: str) -> None:
    # Our own arguments, run with this interpreter's uv.
    command = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", *args]
    subprocess.run(command, check=True)  # noqa: S603


def strip_hashes(text: str) -> str:
    """The same file without its `--hash` lines and the line continuations before them."""
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("--hash=")]
    return "\n".join(line.removesuffix(" \\") for line in kept) + "\n"


def compile_lock(extra: list[str]) -> None:
    """Resolve lock.txt (keeping every pin the ranges allow, unless `extra` says --upgrade),
    then make the exports from it."""
    common = [*TARGET, "--generate-hashes", HEADER, "tox -e lock"]
    uv(
        "setup.cfg",
        "requirements/tools.in",
        "bench/requirements.txt",
        "--all-extras",
        *common,
        "--output-file",
        "requirements/lock.txt",
        *extra,
    )
    CONSTRAINTS.write_text(strip_hashes(LOCK.read_text()))
    # Subsets of the same resolution: every package is pinned by the constraints, so these
    # resolve to the lock's versions or fail.
    constrain = ["--constraint", "requirements/constraints.txt", "--no-annotate"]
    uv(
        "setup.cfg",
        "--extra",
        "tracing",
        *common,
        *constrain,
        "--output-file",
        "requirements/image.txt",
    )
    requirements = HERE / "build.in"
    uv(
        str(requirements.relative_to(ROOT)),
        *common,
        *constrain,
        "--output-file",
        "requirements/build.txt",
    )
    check_exports()


def check_exports() -> None:
    """Every export names the lock's versions (a test runs this too)."""
    locked = pins(LOCK)
    for export in (CONSTRAINTS, IMAGE, BUILD):
        for name, version in pins(export).items():
            if locked.get(name) != version:
                raise SystemExit(
                    f"{export.name}: {name}=={version}, the lock has {locked.get(name)}"
                )
    if pins(CONSTRAINTS) != locked:
        raise SystemExit("constraints.txt does not name every pin of lock.txt")


def requirement_name(line: str) -> str:
    return normalize(re.split(r"[\s\[<>=!~;]", line.strip(), maxsplit=1)[0])


def compile_oldest(output: str) -> None:
    """The package's own ranges (install_requires, tracing) at their lower bounds, as uv's
    lowest-direct resolution picks them; the test tools pinned to the lock."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    tracing = {requirement_name(line) for line in extras["tracing"].splitlines() if line.strip()}
    tools = {
        requirement_name(line)
        for line in extras["test"].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    } - tracing
    locked = pins(LOCK)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pinned:
        pinned.write("".join(f"{name}=={locked[name]}\n" for name in sorted(tools)))
        pinned.flush()
        uv(
            str(ROOT / "setup.cfg"),
            "--extra",
            "test",
            "--resolution",
            "lowest-direct",
            *TARGET,
            "--no-header",
            "--constraint",
            pinned.name,
            "--output-file",
            output,
        )
    print(Path(output).read_text())


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("check", [])
    if command == "compile":
        os.chdir(ROOT)  # the paths in the files' annotations are relative to the checkout
        compile_lock(rest)
        return 0
    if command == "oldest" and len(rest) == 1:
        compile_oldest(rest[0])
        return 0
    if command in {"check", "diff"}:
        found = differences(pins(LOCK), installed())
        where = sys.prefix
        if not found:
            print(f"lock: {where} has exactly the locked versions")
            return 0
        print(f"lock: {where} differs from requirements/lock.txt:")
        for line in found:
            print(f"  {line}")
        return 1 if command == "check" else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
