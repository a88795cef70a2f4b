"""tox -e mutation: mutmut over the pure core, then a score per module, failing below 90 %.

    python tests/mutation/score.py [--max-children N]

Runs ``mutmut run`` from a clean slate (``mutants/`` removed: no result is reused from an
earlier run with other tests), then reads the verdict of every mutant from mutmut's
``mutants/**/*.py.meta`` files. A mutant counts as killed when a test failed or timed out with
it (or the type check caught it); survived, or reached by no test, it counts against the
module. Survivors listed in ``tests/mutation/equivalent.txt`` (each with the reason it changes
nothing observable) are left out of their module's total. Which modules are mutated, and with
which tests, is ``[tool.mutmut]`` in pyproject.toml.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"
THRESHOLD = 0.90
KILLED = {1, 3, 36, 37, 24, -24, 152, 255}  # failed, pytest error, timeouts, type check
SURVIVED = {0}


def equivalent() -> dict[str, str]:
    """Mutant name -> why it changes nothing observable."""
    listed: dict[str, str] = {}
    for line in EQUIVALENT.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            sys.exit(f"{EQUIVALENT.name}: {name} has no reason")
        listed[name] = reason.strip()
    return listed


def verdicts() -> dict[str, dict[str, int | None]]:
    """Module -> mutant name -> exit code."""
    found: dict[str, dict[str, int | None]] = {}
    for meta in sorted((ROOT / "mutants" / "src").rglob("*.py.meta")):
        relative = meta.relative_to(ROOT / "mutants" / "src").with_suffix("").with_suffix("")
        module = ".".join(relative.parts)
        found[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--report-only", action="store_true", help="judge the results in mutants/, run nothing"
    )
    options = parser.parse_args()
    os.chdir(ROOT)
    started = time.monotonic()
    if not options.report_only:
        shutil.rmtree("mutants", ignore_errors=True)
        run = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(options.max_children)],
            check=False,
            stdout=subprocess.DEVNULL,  # a progress line redrawn per mutant
        )
        if run.returncode != 0:
            print(f"mutmut run failed (exit {run.returncode})")
            return 1
    took = time.monotonic() - started
    listed = equivalent()
    seen: set[str] = set()
    failed = False
    ran = "results in mutants/" if options.report_only else f"mutmut, {took:.0f} s"
    print(f"\nmutation scores ({ran}; at least {THRESHOLD:.0%} per module):")
    for module, codes in verdicts().items():
        counts: collections.Counter[str] = collections.Counter()
        unlisted = []
        for name, code in codes.items():
            if name in listed:
                seen.add(name)
                if code in SURVIVED:
                    counts["equivalent"] += 1
                    continue
                print(f"  {name} is listed as equivalent but did not survive (exit {code})")
                failed = True
            if code in KILLED:
                counts["killed"] += 1
            else:
                counts["survived" if code in SURVIVED else "not reached"] += 1
                unlisted.append((name, code))
        judged = counts["killed"] + counts["survived"] + counts["not reached"]
        if not judged + counts["equivalent"]:
            continue  # a module without code to mutate (a package's __init__)
        score = counts["killed"] / judged if judged else 1.0
        raw = counts["killed"] / (judged + counts["equivalent"])
        verdict = "ok" if score >= THRESHOLD else "FAIL"
        failed |= score < THRESHOLD
        print(
            f"  {module:40} {score:7.1%}  {counts['killed']:4} killed of {judged:4}"
            f" ({counts['survived']} survived, {counts['not reached']} reached by no test;"
            f" {counts['equivalent']} equivalent left out, {raw:.1%} with them)  {verdict}"
        )
        for name, code in unlisted:
            print(f"      survivor: {name} (exit {code})")
    for name in sorted(set(listed) - seen):
        print(f"  {name} is listed as equivalent but is no mutant any more")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
