"""Sync N pending counters (and their history rows) into PostgreSQL, against one UPDATE per row
(the original's way)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sqlalchemy import text

from bench.servers import fresh_store
from viewmw import KeySchema, Store
from viewmw.sync import ViewSync

BASELINE_SAMPLE = 5_000


@dataclass
class SyncFigures:
    """One sync measurement and its baselines (rows per second)."""

    counters: int
    viewmw_seconds: float
    baseline_rows_per_second: float
    autocommit_rows_per_second: float

    @property
    def viewmw_rows_per_second(self) -> float:
        return self.counters / self.viewmw_seconds

    @property
    def speedup(self) -> float:
        return self.viewmw_rows_per_second / self.baseline_rows_per_second


async def _fill_pending(redis: aioredis.Redis, counters: int) -> None:
    """Pending counters as the recording script leaves them: each with its views of the day in
    its days hash, so the sync also moves and commits one history row per counter."""
    keys = KeySchema()
    today = datetime.now(UTC).date().isoformat()
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(1, counters + 1, 10_000):
            ids = range(start, min(start + 10_000, counters + 1))
            for content_id in ids:
                pipe.set(keys.pending("story", str(content_id)), 1 + content_id % 7)
                pipe.hset(keys.days("story", str(content_id)), today, 1 + content_id % 7)
            pipe.sadd(keys.dirty, *(keys.member("story", str(i)) for i in ids))
            await pipe.execute()


_UPDATE_ONE = text("UPDATE stories SET view_count = view_count + :d WHERE id = :id")


async def _baseline(store: Store, *, autocommit: bool) -> float:
    """Rows per second of one UPDATE statement per row, on a sample: in one transaction, or each
    committed on its own as the original service did."""
    engine = store.engine.execution_options(isolation_level="AUTOCOMMIT") if autocommit else None
    async with (engine or store.engine).begin() as connection:
        started = time.perf_counter()
        for content_id in range(1, BASELINE_SAMPLE + 1):
            await connection.execute(_UPDATE_ONE, {"d": 1 + content_id % 7, "id": content_id})
        return BASELINE_SAMPLE / (time.perf_counter() - started)


async def run_sync_bench(redis: aioredis.Redis, counters: int) -> SyncFigures:
    """Time one full sync of ``counters`` pending counters, and the baseline on a sample."""
    await redis.flushdb()
    store = await fresh_store(rows=counters)
    try:
        baseline = await _baseline(store, autocommit=False)
        autocommit = await _baseline(store, autocommit=True)
        await _fill_pending(redis, counters)
        started = time.perf_counter()
        report = await ViewSync(redis, store).run()
        seconds = time.perf_counter() - started
        if report.contents != counters:
            raise AssertionError(f"synced {report.contents} of {counters} counters")
        return SyncFigures(counters, seconds, baseline, autocommit)
    finally:
        await store.close()
        await redis.flushdb()
