"""Database-only counting: buffering, flushing through the ledger, limits, retries."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.support import FakeClock
from viewmw import Store
from viewmw.fallback import DatabaseFallback

DAY = "2025-11-24"


async def test_counts_once_per_viewer_per_content_per_day_then_flushes(store: Store) -> None:
    fallback = DatabaseFallback(store, flush_seconds=60)
    outcomes = [await fallback.track_view("task", "1", f"user:{n % 3}", DAY) for n in range(9)]
    assert outcomes == [True, True, True] + [False] * 6
    assert fallback.buffered == 3
    assert await fallback.count("task", "1") == 3  # database 0 + buffered 3
    assert await fallback.flush() == 3
    assert fallback.buffered == 0
    assert await store.read_count("task", "1") == 3
    assert await fallback.count("task", "1") == 3  # not doubled after the flush
    assert await fallback.track_view("task", "1", "user:0", "2025-11-25")  # a new day
    await fallback.aclose()
    assert await store.read_count("task", "1") == 4


async def test_write_through_commits_each_view(store: Store) -> None:
    fallback = DatabaseFallback(store, flush_seconds=0)
    for n in range(5):
        assert await fallback.track_view("task", "w", f"user:{n}", DAY)
        assert await store.read_count("task", "w") == n + 1
    assert fallback.buffered == 0


async def test_a_flush_whose_commit_was_lost_is_not_counted_twice(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit goes through but its answer is lost: the retry reuses the batch id."""
    fallback = DatabaseFallback(store, flush_seconds=60)
    for n in range(4):
        await fallback.track_view("task", "7", f"user:{n}", DAY)
    real_commit = store.commit_batch
    calls = []

    async def commit_then_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0])
        await real_commit(*args, **kwargs)
        raise ConnectionResetError("answer lost")

    monkeypatch.setattr(store, "commit_batch", commit_then_fail)
    assert await fallback.flush() == 0
    assert fallback.buffered == 4 and fallback.stats.flush_failures == 1
    monkeypatch.setattr(store, "commit_batch", real_commit)
    await fallback.track_view("task", "7", "user:9", DAY)  # arrives while the retry is pending
    assert await fallback.flush() == 5  # the ledger already had the first batch: not re-added
    assert await store.read_count("task", "7") == 5
    assert fallback.buffered == 0


async def test_database_down_keeps_views_and_retries(sqlite_store: Store) -> None:
    fallback = DatabaseFallback(sqlite_store, flush_seconds=60)
    for n in range(3):
        await fallback.track_view("task", "d", f"user:{n}", DAY)
    async with sqlite_store.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE viewmw_sync_batches RENAME TO parked"))
    assert await fallback.flush() == 0
    assert await fallback.flush() == 0
    assert fallback.buffered == 3 and fallback.stats.flush_failures == 2
    async with sqlite_store.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE parked RENAME TO viewmw_sync_batches"))
    assert await fallback.flush() == 3
    assert await sqlite_store.read_count("task", "d") == 3


async def test_a_full_buffer_drops_views_counts_and_logs_them(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    fallback = DatabaseFallback(sqlite_store, flush_seconds=60, max_buffered_views=5)
    outcomes = [await fallback.track_view("task", str(n), "user:1", DAY) for n in range(8)]
    assert outcomes == [True] * 5 + [False] * 3
    assert fallback.stats.dropped == 3
    assert sum("fallback buffer full" in r.getMessage() for r in caplog.records) == 1
    await fallback.aclose()
    assert sum([await sqlite_store.read_count("task", str(n)) for n in range(8)]) == 5


async def test_display_count_is_cached_briefly(sqlite_store: Store, clock: FakeClock) -> None:
    fallback = DatabaseFallback(sqlite_store, flush_seconds=60, count_cache_seconds=5, clock=clock)
    assert await fallback.count("task", "c") == 0
    async with sqlite_store.engine.begin() as connection:
        await connection.execute(text("INSERT INTO viewmw_view_counts VALUES ('task', 'c', 10)"))
    assert await fallback.count("task", "c") == 0  # still the cached read
    clock.advance(5.1)
    assert await fallback.count("task", "c") == 10
