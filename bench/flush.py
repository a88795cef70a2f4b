"""Flush cost: one batch applied with the service's own ``writebehind.apply_batch``.

For each size, on a fresh table (TRUNCATE counters, applied_batches):

* ``insert``: a batch of ``size`` keys that are not in the table yet (every row is new);
* ``update``: a second batch with the same keys (every row exists: update-only).

The time includes what the service pays at flush: asyncpg encoding the two arrays, the one
statement, and its commit. A warm-up batch first prepares the statement on the connection, as
the service's pooled connections have it prepared after their first flush.

    python -m bench.flush --database-url postgresql://postgres@127.0.0.1:5432/bench_flush

(bench.run runs it by path, ``--no-migrate``, in a process of its own: see run_flush_process.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import asyncpg

from increment_service.writebehind import Batch, apply_batch

STATEMENT_TIMEOUT = 120.0


@dataclasses.dataclass
class FlushResult:
    keys: int
    case: str  # "insert" (new keys) or "update" (keys already present)
    seconds: list[float]  # one per repeat

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rows_per_s(self) -> float:
        return self.keys / self.median_s

    def as_dict(self) -> dict[str, object]:
        return {
            "keys": self.keys,
            "case": self.case,
            "seconds": [round(s, 4) for s in self.seconds],
            "median_s": round(self.median_s, 4),
            "rows_per_s": round(self.rows_per_s),
        }


def make_batch(seq: int, keys: list[str]) -> Batch:
    """A Batch built directly. Fields beyond the core five (the service's Batch grows optional
    extras, e.g. for overflow handling) get an empty value of their annotated container type
    when they have no default, so this keeps working while the dataclass evolves."""
    values: dict[str, Any] = {
        "replica_id": "bench-flush",
        "seq": seq,
        "keys": keys,
        "deltas": [1] * len(keys),
        "oldest": time.monotonic(),
    }
    for field in dataclasses.fields(Batch):
        no_default = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if field.name not in values and no_default:
            annotation = str(field.type)
            values[field.name] = {} if annotation.startswith("dict") else []
    return Batch(**values)


async def _timed_apply(conn: asyncpg.Connection[asyncpg.Record], batch: Batch) -> float:
    started = time.perf_counter()
    applied = await apply_batch(conn, batch, statement_timeout=STATEMENT_TIMEOUT)
    elapsed = time.perf_counter() - started
    if not applied.fresh or applied.rejected:
        raise RuntimeError(f"unexpected flush outcome for {len(batch.keys)} keys: {applied}")
    return elapsed


async def run_flush_bench(
    database_url: str, sizes: list[int], repeats: int = 3
) -> list[FlushResult]:
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database_url)
    results: list[FlushResult] = []
    try:
        seq = 0
        await conn.execute("TRUNCATE counters, applied_batches")
        seq += 1
        await _timed_apply(conn, make_batch(seq, [f"warmup:{i:03d}" for i in range(100)]))
        for size in sizes:
            inserts = FlushResult(size, "insert", [])
            updates = FlushResult(size, "update", [])
            for repeat in range(repeats):
                await conn.execute("TRUNCATE counters, applied_batches")
                await conn.execute("VACUUM ANALYZE counters")
                keys = sorted(f"flush:{size}:{repeat}:{i:07d}" for i in range(size))
                seq += 1
                inserts.seconds.append(await _timed_apply(conn, make_batch(seq, keys)))
                seq += 1
                updates.seconds.append(await _timed_apply(conn, make_batch(seq, keys)))
                total = await conn.fetchval("SELECT sum(value) FROM counters")
                if total != 2 * size:
                    raise RuntimeError(f"expected sum {2 * size} after two batches, got {total}")
            results += [inserts, updates]
        await conn.execute("TRUNCATE counters, applied_batches")
    finally:
        await conn.close()
    return results


async def run_flush_process(
    database_url: str, sizes: list[int], repeats: int, pythonpath: str | None
) -> list[FlushResult]:
    """run_flush_bench in a process of its own, this script run by path: with ``pythonpath``
    (bench.run's --service-pythonpath) it times that tree's apply_batch, as the servers run
    that tree's service. Alone on the machine's side too: no server runs meanwhile."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--database-url",
        database_url,
        "--sizes",
        ",".join(map(str, sizes)),
        "--repeats",
        str(repeats),
        "--no-migrate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"flush.py exited {process.returncode}: {errors.decode()[-400:]}")
    return [FlushResult(row["keys"], row["case"], row["seconds"]) for row in json.loads(output)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--database-url", required=True, help="a database this bench may wipe")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-migrate", action="store_true", help="the schema is there already (bench.run)"
    )
    args = parser.parse_args()
    if not args.no_migrate:
        from bench.servers import migrate  # run as a module, from the repository root

        migrate(args.database_url)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = asyncio.run(run_flush_bench(args.database_url, sizes, args.repeats))
    print(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
