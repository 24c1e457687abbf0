"""Outage figures: how fast the outbox absorbs views while Redis is down, and how fast the replay
feeds them through the rules once it is back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.servers import bench_settings, fresh_store
from viewmw import Outbox, OutboxEvent, Replayer, ViewTracker

VIEWS = 20_000
CONCURRENCY = 200


@dataclass
class OutageFigures:
    """Views per second written to the outbox (``CONCURRENCY`` requests at a time), and events
    per second replayed."""

    views: int
    absorb_per_second: float
    replay_per_second: float


async def run_outage_bench(redis: aioredis.Redis) -> OutageFigures:
    """Offer ``VIEWS`` views to the outbox as concurrent requests would, then replay them."""
    await redis.flushdb()
    store = await fresh_store()
    outbox = Outbox(store.engine)
    try:
        start = time.time()
        events = [
            OutboxEvent.new("story", str(n % 1000), f"user:{n}", start + n / 1000)
            for n in range(VIEWS)
        ]
        started = time.perf_counter()
        for first in range(0, VIEWS, CONCURRENCY):
            written = await asyncio.gather(
                *(outbox.add(event) for event in events[first : first + CONCURRENCY])
            )
            if not all(written):
                raise AssertionError("an outbox write failed during the benchmark")
        absorb = VIEWS / (time.perf_counter() - started)
        tracker = ViewTracker(redis, store, bench_settings())
        started = time.perf_counter()
        report = await Replayer(tracker, outbox).replay()
        replay = report.events / (time.perf_counter() - started)
        if report.counted != VIEWS:
            raise AssertionError(f"replay counted {report.counted} of {VIEWS}")
        return OutageFigures(VIEWS, absorb, replay)
    finally:
        await outbox.aclose()
        await store.close()
        await redis.flushdb()
