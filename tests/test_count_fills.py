"""A database read that is slower than a request's deadline goes on and fills the count cache.

Cancelled with its request, a slow read (or a connection still being opened) would start again
on every request and the cache would never fill; run past the deadline, it fills the cache once
for the requests after it. At most ``MAX_FILLS_IN_FLIGHT`` such reads run at once, and their
outcome, not the request's deadline, tells the database breaker whether the database works.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support import FakeClock
from viewmw import Settings, Store, ViewTracker
from viewmw.outage.breaker import BreakerState
from viewmw.tracker import MAX_FILLS_IN_FLIGHT


class HeldReads:
    """Holds every ``store.read_counts`` call until released (or makes it fail)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None
        original = store.read_counts

        async def read_counts(content_type: str, ids: Any, batch_id: str = "") -> Any:
            self.calls += 1
            await self.release.wait()
            if self.error is not None:
                raise self.error
            return await original(content_type, ids, batch_id)

        monkeypatch.setattr(store, "read_counts", read_counts)


@pytest.fixture
def quick_tracker(real_redis: aioredis.Redis, store: Store, clock: FakeClock) -> ViewTracker:
    """A tracker whose requests wait on the database for a millisecond only."""
    settings = Settings(
        secret="test-secret-0123456789", redis_timeout=5.0, database_request_timeout=0.001
    )
    return ViewTracker(real_redis, store, settings, clock=clock)


async def test_a_read_slower_than_the_deadline_fills_the_cache_for_the_next_request(
    quick_tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = HeldReads(store, monkeypatch)

    first = await quick_tracker.track_view("story", 1, "user:1")

    assert first.counted and first.count is None  # counted; the count came too late to show
    reads.release.set()
    await quick_tracker.drain()  # the read went on after the request's deadline
    second = await quick_tracker.track_view("story", 1, "user:2")
    assert second.count is not None and second.count.total == 2
    assert reads.calls == 1  # the second request found the cache filled: no SQL
    assert quick_tracker.database_breaker.state is BreakerState.CLOSED


async def test_concurrent_misses_never_hold_more_than_the_cap_of_database_reads(
    quick_tracker: ViewTracker,
    store: Store,
    real_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = HeldReads(store, monkeypatch)

    results = await asyncio.gather(
        *(quick_tracker.track_view("story", n, f"user:{n}") for n in range(1, 21))
    )

    assert all(result.counted and result.count is None for result in results)
    assert reads.calls == MAX_FILLS_IN_FLIGHT
    reads.release.set()
    await quick_tracker.drain()
    cached = await real_redis.mget([f"story:dbviews:{n}" for n in range(1, 21)])
    assert sum(value is not None for value in cached) == MAX_FILLS_IN_FLIGHT


async def test_a_read_that_fails_after_the_deadline_counts_against_the_database(
    quick_tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = HeldReads(store, monkeypatch)
    reads.error = OSError("connection refused")
    breaker = quick_tracker.database_breaker

    for n in range(breaker.failure_threshold):
        assert (await quick_tracker.track_view("story", n + 1, "user:1")).count is None
        reads.release.set()
        await quick_tracker.drain()
        reads.release.clear()

    assert breaker.state is BreakerState.OPEN
    assert reads.calls == breaker.failure_threshold


async def test_a_read_past_the_background_deadline_is_a_database_failure(
    real_redis: aioredis.Redis, store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        secret="test-secret-0123456789",
        redis_timeout=5.0,
        database_request_timeout=0.001,
        database_timeout=0.01,
    )
    tracker = ViewTracker(real_redis, store, settings, clock=clock)
    reads = HeldReads(store, monkeypatch)  # never released: reads that hang
    breaker = tracker.database_breaker

    for n in range(breaker.failure_threshold):
        await tracker.track_view("story", n + 1, "user:1")
        await tracker.drain()  # ends: the hung read is stopped at database_timeout

    assert reads.calls == breaker.failure_threshold
    assert breaker.state is BreakerState.OPEN


async def test_a_fill_that_redis_fails_to_store_is_no_database_failure(
    quick_tracker: ViewTracker,
    store: Store,
    real_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = HeldReads(store, monkeypatch)
    reads.release.set()
    evalsha = real_redis.evalsha

    async def storing_fails(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == quick_tracker.scripts.fill_cache.sha:
            raise RedisConnectionError("the node holding the count went away")
        return await evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(real_redis, "evalsha", storing_fails)
    breaker = quick_tracker.database_breaker
    for n in range(breaker.failure_threshold + 1):
        assert (await quick_tracker.track_view("story", n + 1, "user:1")).count is None
        await quick_tracker.drain()

    # The database answered every read: its breaker stays closed, and every miss was read.
    assert reads.calls == breaker.failure_threshold + 1
    assert breaker.state is BreakerState.CLOSED
