"""Redis memory per tracked (viewer, content) pair and per pending counter, on a private server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.servers import bench_settings
from viewmw import ViewTracker

VIEWS = 100_000
CONTENTS = 5_000
CONTENTS_PER_VIEWER = 5  # each viewer reads a few pages a day


@dataclass
class MemoryFigures:
    """Bytes of Redis memory, from ``INFO memory`` before and after."""

    views: int
    bytes_per_pair: float
    bytes_per_pending_counter: float
    server: str


async def _used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def _server(redis: aioredis.Redis) -> str:
    """The server's name, version and allocator: each keeps a key in its own number of bytes."""
    info = await redis.info("server")
    allocator = (await redis.info("memory")).get("mem_allocator", "?")
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']} ({allocator})"
    return f"Redis {info.get('redis_version', '?')} ({allocator})"


async def run_memory_bench(redis: aioredis.Redis) -> MemoryFigures:
    """Track ``VIEWS`` views (each a distinct (viewer, content) pair), then measure."""
    await redis.flushdb()
    tracker = ViewTracker(redis, None, bench_settings())
    # Warm up shared structures (dirty set, script cache) so they are not charged to pairs.
    await tracker.track_view("story", "warmup", "user:warmup")
    before = await _used_memory(redis)
    for start in range(0, VIEWS, 1000):
        await _track_many(tracker, range(start, start + 1000))
    after = await _used_memory(redis)
    pending_keys = [key async for key in redis.scan_iter(match="*:views:*", count=1000)]
    pending_bytes = sum([int(await redis.memory_usage(key) or 0) for key in pending_keys[:1000]])
    figures = MemoryFigures(
        VIEWS,
        # Counters and the dirty set are per content, not per pair: subtract them.
        (after - before - pending_bytes / min(len(pending_keys), 1000) * CONTENTS) / VIEWS,
        pending_bytes / min(len(pending_keys), 1000),
        await _server(redis),
    )
    await redis.flushdb()
    return figures


async def _track_many(tracker: ViewTracker, numbers: range) -> None:
    # An anonymous viewer token has the length identity.py gives it (16 characters).
    await asyncio.gather(
        *(
            tracker.track_view("story", n % CONTENTS, f"anon:{n // CONTENTS_PER_VIEWER:016d}")
            for n in numbers
        )
    )
