"""Batch count reads: ``get_view_counts`` for 1 000 ids against 1 000 single reads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.servers import bench_settings, fresh_store
from viewmw import ViewTracker

IDS = 1_000
ROUNDS = 5


@dataclass
class ReadFigures:
    """Seconds per 1 000 counts, each way (best of a few rounds, cache warm)."""

    batch_seconds: float
    single_seconds: float

    @property
    def speedup(self) -> float:
        return self.single_seconds / self.batch_seconds


async def run_reads_bench(redis: aioredis.Redis) -> ReadFigures:
    """Warm the count cache, then time both ways of reading 1 000 counts."""
    await redis.flushdb()
    store = await fresh_store(rows=IDS)
    try:
        tracker = ViewTracker(redis, store, bench_settings(), pipelining=False)
        ids = list(range(1, IDS + 1))
        expected = await tracker.get_view_counts("story", ids)  # fills the cache
        batch, single = [], []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            counts = await tracker.get_view_counts("story", ids)
            batch.append(time.perf_counter() - started)
            started = time.perf_counter()
            for content_id in ids:
                await tracker.get_view_count("story", content_id)
            single.append(time.perf_counter() - started)
            if counts != expected:
                raise AssertionError("batch read changed between rounds")
        return ReadFigures(min(batch), min(single))
    finally:
        await store.close()
        await redis.flushdb()
