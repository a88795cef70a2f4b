"""Many connections, many keys, several replicas flushing into one database: exact totals."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import aiohttp

from tests.support.load import Traffic
from tests.support.metrics import metric_value
from tests.support.polling import eventually
from tests.support.postgres import wait_until_persisted
from tests.support.processes import ServiceProcess, running


async def test_replicas_persist_exactly_what_they_acknowledged(
    clean: None, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "FLUSH_INTERVAL_SECONDS": "0.5",
        "DATA_DIR": str(tmp_path),
    }
    rng = random.Random(7)
    # Hot keys and a long tail, negative values included.
    keys = [f"hot-{i}" for i in range(5)] + [f"tail-{i}" for i in range(1500)]
    items = [(rng.choice(keys), rng.randint(-5, 50)) for _ in range(6000)]
    single = ServiceProcess({**env, "REPLICA_ID": "single"}, tmp_path / "single.log")
    pair = ServiceProcess({**env, "REPLICA_ID": "pair", "WORKERS": "2"}, tmp_path / "pair.log")
    with running(single), running(pair):
        half = len(items) // 2
        to_single, to_pair = await asyncio.gather(
            Traffic(single.url, items[:half], concurrency=24).run(),
            Traffic(pair.url, items[half:], concurrency=24).run(),
        )
        acknowledged: Counter[str] = Counter()  # update(), not +: totals may be zero or negative
        acknowledged.update(to_single.acknowledged())
        acknowledged.update(to_pair.acknowledged())
        assert to_single.unknown() == to_pair.unknown() == []
        assert to_single.statuses() + to_pair.statuses() == {202: len(items)}
        got = await wait_until_persisted(database_url, acknowledged)
        assert got == dict(acknowledged)
        # The two workers of `pair` share one port; either one's /metrics covers both.
        # The other worker's numbers reach a scrape through the file its sampler rewrites
        # twice a second, later still on a busy machine: poll, and never see too many.
        sent_to_pair = len(items) - half

        async def counted_all() -> bool:
            async with aiohttp.ClientSession() as session, session.get(pair.url + "/metrics") as r:
                text = await r.text()
            total = metric_value(text, "increments_total")
            assert total is not None
            assert total <= sent_to_pair
            return total == sent_to_pair and "increment_pending_keys 0.0" in text

        await eventually(counted_all, f"pair's /metrics counts {sent_to_pair} increments")
    # Three replicas (single, and pair's two workers) wrote batches under their own ids.
    assert "already-applied" not in single.log()
