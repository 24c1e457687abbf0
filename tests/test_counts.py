"""Reading counts: database + pending (+ syncing), batch = single, the Redis cache of database
counts, the epoch guard on cache fills, and the statistics.

Database counts are written straight into the SQL tables: ``story`` lives in the ``stories`` table
(conftest's CONTENT_TABLES), ``task`` in viewmw's generic ``viewmw_view_counts`` table. Every test
runs on PostgreSQL and again on SQLite unless it names one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import delete

from tests.conftest import stories
from tests.support import GENEROUS_DEADLINES, FakeClock
from viewmw import Settings, Store, ViewCount, ViewTracker
from viewmw.operator_stats import abuse_stats
from viewmw.store import sync_batches, view_counts
from viewmw.tracker import DATABASE_COUNT_TTL_SECONDS


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest) -> Store:
    """conftest's ``store``, as a plain fixture: the async one in conftest cannot set up an
    async fixture from inside the running loop. Remove this once conftest's is a plain ``def``."""
    name = "pg_store" if request.param == "postgresql" else "sqlite_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(params=["redis", "fakeredis"])
def any_redis(request: pytest.FixtureRequest) -> aioredis.Redis:
    """conftest's ``any_redis``, as a plain fixture (see ``store``)."""
    name = "real_redis" if request.param == "redis" else "fake_redis"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def tracker(real_redis: aioredis.Redis, store: Store, clock: FakeClock) -> ViewTracker:
    return ViewTracker(real_redis, store, Settings(**GENEROUS_DEADLINES), clock=clock)


async def set_db_count(store: Store, content_type: str, content_id: str | int, count: int) -> None:
    """Write a database count directly, as a committed sync would have left it."""
    async with store.engine.begin() as connection:
        if content_type == "story":
            await connection.execute(delete(stories).where(stories.c.id == int(content_id)))
            await connection.execute(stories.insert().values(id=int(content_id), view_count=count))
        else:
            await connection.execute(
                delete(view_counts).where(
                    view_counts.c.content_type == content_type,
                    view_counts.c.content_id == str(content_id),
                )
            )
            await connection.execute(
                view_counts.insert().values(
                    content_type=content_type, content_id=str(content_id), view_count=count
                )
            )


async def add_views(
    tracker: ViewTracker, content_type: str, content_id: str | int, viewers: int, first: int = 0
) -> None:
    """``viewers`` distinct viewers each view the content once (all counted)."""
    for n in range(first, first + viewers):
        assert (await tracker.track_view(content_type, content_id, f"user:{n}")).counted


class SqlSpy:
    """Wraps ``store.read_counts`` to count the SQL reads the tracker makes."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        original = store.read_counts

        async def read_counts(content_type: str, ids: Any, batch_id: str = "") -> Any:
            self.calls.append((content_type, list(ids)))
            return await original(content_type, ids, batch_id)

        monkeypatch.setattr(store, "read_counts", read_counts)


class Exploding:
    """Stands in for a disposed engine: any use fails."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the database was used ({name}) although the count was cached")


# database + pending -----------------------------------------------------------------------------


async def test_count_is_database_plus_pending(
    any_redis: aioredis.Redis, store: Store, clock: FakeClock
) -> None:
    tracker = ViewTracker(any_redis, store, Settings(**GENEROUS_DEADLINES), clock=clock)
    await set_db_count(store, "story", 7, 40)
    await set_db_count(store, "story", 8, 0)
    await set_db_count(store, "task", "t-1", 12)

    await add_views(tracker, "story", 7, 3)
    await add_views(tracker, "story", 9, 1)  # no row in the database
    await add_views(tracker, "task", "t-1", 2)
    last = await tracker.track_view("story", 7, "user:99")

    assert last.count == ViewCount(database=40, pending=4, syncing=0)
    assert last.count.total == 44
    expected = {("story", 7): (40, 4), ("story", 8): (0, 0), ("story", 9): (0, 1)}
    expected |= {("task", "t-1"): (12, 2), ("task", "t-2"): (0, 0)}
    for (kind, content_id), (database, pending) in expected.items():
        assert await tracker.get_view_count(kind, content_id) == database + pending
        assert await tracker.get_redis_view_count(kind, content_id) == pending
        assert await tracker.get_database_view_count(kind, content_id) == database
        details = await tracker.get_view_count_details(kind, [content_id])
        assert details == {str(content_id): ViewCount(database, pending, 0)}
    # An id that cannot exist in the integer-keyed stories table has a database count of 0.
    assert await tracker.get_view_count("story", "not-a-number") == 0


async def test_without_a_store_the_database_part_is_0(
    real_redis: aioredis.Redis, clock: FakeClock
) -> None:
    tracker = ViewTracker(real_redis, None, Settings(**GENEROUS_DEADLINES), clock=clock)
    await add_views(tracker, "story", 7, 2)
    assert await tracker.get_view_count_details("story", [7, 8]) == {
        "7": ViewCount(0, 2, 0),
        "8": ViewCount(0, 0, 0),
    }
    assert await tracker.get_database_view_count("story", 7) == 0
    assert await real_redis.get("story:dbviews:7") is None  # nothing to cache


async def test_batch_reads_equal_single_reads(
    tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = list(range(1, 41))
    for content_id in ids:
        if content_id % 4:
            await set_db_count(store, "story", content_id, content_id * 7 % 13)
        if content_id % 3 == 0:
            await set_db_count(store, "task", f"t{content_id}", content_id)
    for content_id in ids[::5]:
        await add_views(tracker, "story", content_id, content_id % 4 + 1)
        await add_views(tracker, "task", f"t{content_id}", 2, first=100)
    expected_story = {
        str(i): (i * 7 % 13 if i % 4 else 0) + (i % 4 + 1 if i in ids[::5] else 0) for i in ids
    }
    expected_task = {f"t{i}": (i if i % 3 == 0 else 0) + (2 if i in ids[::5] else 0) for i in ids}
    await tracker.redis.delete(*[f"story:dbviews:{i}" for i in ids])  # start cold
    await tracker.redis.delete(*[f"task:dbviews:t{i}" for i in ids])
    spy = SqlSpy(store, monkeypatch)

    cold_batch = await tracker.get_view_counts("story", ids)
    assert len(spy.calls) == 1  # one SQL query for all 40 misses
    assert cold_batch == expected_story
    assert list(cold_batch) == [str(i) for i in ids]  # in the order given

    singles = {str(i): await tracker.get_view_count("story", i) for i in ids}
    assert singles == cold_batch
    assert await tracker.get_view_counts("story", ids) == cold_batch  # now from the cache
    assert len(spy.calls) == 1

    # The other way round: single reads first (each fills its own cache entry), then the batch.
    task_ids = [f"t{i}" for i in ids]
    singles = {i: await tracker.get_view_count("task", i) for i in task_ids}
    assert singles == expected_task
    assert await tracker.get_view_counts("task", task_ids) == singles

    # Duplicates collapse; an int and its text are one id; nothing asked, nothing read.
    assert await tracker.get_view_counts("story", [3, "3", 1, 3]) == {
        "3": expected_story["3"],
        "1": expected_story["1"],
    }
    assert await tracker.get_view_counts("story", []) == {}


async def test_syncing_views_are_counted_once_before_and_after_the_commit(
    tracker: ViewTracker, store: Store
) -> None:
    """An unsettled sync batch holds 5 views of story 7 (pending -> syncing)."""
    redis = tracker.redis
    await set_db_count(store, "story", 7, 10)
    await add_views(tracker, "story", 7, 2)  # pending 2
    await redis.delete("story:dbviews:7")
    await redis.set("story:syncing:7", 5)
    await redis.hset("viewmw:sync:batch", mapping={"id": "batch-1"})

    # Not committed yet: the database lacks the 5.
    assert await tracker.get_view_count_details("story", [7]) == {"7": ViewCount(10, 2, 5)}
    assert await tracker.get_view_count("story", 7) == 17
    assert await tracker.get_redis_view_count("story", 7) == 7

    # The batch commits (database + 5, ledger row) but is not settled in Redis yet.
    await set_db_count(store, "story", 7, 15)
    async with store.engine.begin() as connection:
        now = datetime.now(UTC)
        await connection.execute(
            sync_batches.insert().values(
                batch_id="batch-1", started_at=now, committed_at=now, contents=1, views=5
            )
        )
    assert await tracker.get_view_count("story", 7) == 17  # the cached 10 still holds
    await redis.delete("story:dbviews:7")
    # A fresh read sees 15 in the database and the batch in the ledger: it caches 15 - 5, never
    # 15 (which would show 22 until the settle).
    assert await tracker.get_view_count("story", 7) == 17
    assert await redis.get("story:dbviews:7") == b"10"
    assert await tracker.get_database_view_count("story", 7) == 15


# The cache of database counts --------------------------------------------------------------------


async def test_the_first_read_fills_the_cache_and_later_reads_need_no_sql(
    tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = tracker.redis
    await set_db_count(store, "story", 7, 40)
    await set_db_count(store, "task", "t-1", 3)
    assert await redis.get("story:dbviews:7") is None

    assert await tracker.get_view_count("story", 7) == 40
    assert await tracker.get_view_counts("task", ["t-1"]) == {"t-1": 3}
    assert await redis.get("story:dbviews:7") == b"40"
    assert await redis.get("task:dbviews:t-1") == b"3"
    # A cached count expires after a day at the latest, then one SQL read fills it again.
    assert 0 < await redis.ttl("story:dbviews:7") <= DATABASE_COUNT_TTL_SECONDS

    # Break the database: dispose of the engine, and fail any further use of it.
    await store.engine.dispose()
    monkeypatch.setattr(store, "engine", Exploding())
    spy = SqlSpy(store, monkeypatch)

    assert await tracker.get_view_count("story", 7) == 40
    result = await tracker.track_view("story", 7, "user:1")
    assert result.counted and result.count == ViewCount(40, 1, 0)
    assert await tracker.get_view_counts("story", [7]) == {"7": 41}
    assert await tracker.get_view_counts("task", ["t-1"]) == {"t-1": 3}
    assert spy.calls == []

    # An uncached content now needs the (broken) database: its view still counts, its count is
    # left out rather than guessed.
    result = await tracker.track_view("story", 8, "user:1")
    assert result.counted and result.count is None
    assert await tracker.get_view_counts("story", [7, 8]) == {"7": 41}
    assert await redis.get("story:views:8") == b"1"
    assert await redis.get("story:dbviews:8") is None
    assert len(spy.calls) == 2


async def test_the_cache_is_read_even_when_the_database_changes_behind_it(
    tracker: ViewTracker, store: Store
) -> None:
    """Only a sync changes database counts, and it settles the cache itself; a count written
    behind viewmw's back shows in get_database_view_count (SQL) but not in the cached total."""
    await set_db_count(store, "story", 7, 40)
    assert await tracker.get_view_count("story", 7) == 40
    await set_db_count(store, "story", 7, 99)
    assert await tracker.get_view_count("story", 7) == 40
    assert await tracker.get_database_view_count("story", 7) == 99


# The epoch guard --------------------------------------------------------------------------------


def sync_during_read(
    store: Store, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, sync: Callable[..., Any]
) -> list[int]:
    """Make ``store.read_counts`` read the database, then run ``sync`` before returning what it
    read, as a sync that settles between the tracker's read script and its cache fill would."""
    original = store.read_counts
    runs: list[int] = []

    async def read_counts(content_type: str, ids: Any, batch_id: str = "") -> Any:
        counts = await original(content_type, ids, batch_id)
        if not runs:
            await sync()
        runs.append(1)
        return counts

    monkeypatch.setattr(store, "read_counts", read_counts)
    return runs


async def test_a_cache_fill_never_stores_a_count_a_sync_made_stale(
    tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = tracker.redis
    await set_db_count(store, "story", 7, 10)
    await add_views(tracker, "story", 7, 5)  # pending 5
    await redis.delete("story:dbviews:7")

    async def sync() -> None:
        # The sync moves the 5 pending views into the database and bumps the epoch.
        await set_db_count(store, "story", 7, 15)
        await redis.delete("story:views:7")
        await redis.incr("viewmw:epoch")

    runs = sync_during_read(store, redis, monkeypatch, sync)
    # The first read saw pending 5 and the database said 10; caching 10 would show 10, losing 5.
    # The fill is refused, and the retry reads Redis and the database again.
    assert await tracker.get_view_counts("story", [7]) == {"7": 15}
    assert runs == [1, 1]
    assert await redis.get("story:dbviews:7") == b"15"


async def test_an_epoch_bump_during_a_fill_is_retried_not_cached(
    tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = tracker.redis
    for content_id in (7, 8):
        await set_db_count(store, "story", content_id, 10)

    async def bump() -> None:
        await redis.incr("viewmw:epoch")

    runs = sync_during_read(store, redis, monkeypatch, bump)
    result = await tracker.track_view("story", 7, "user:1")
    assert result.counted and result.count is not None and result.count.total == 11
    assert runs == [1, 1]  # the overtaken fill was refused and read again
    assert await redis.get("story:dbviews:7") == b"10"
    assert await redis.exists("story:dbviews:8") == 0

    assert await tracker.get_view_counts("story", [7, 8]) == {"7": 11, "8": 10}
    assert await redis.mget("story:dbviews:7", "story:dbviews:8") == [b"10", b"10"]


async def test_invalidating_drops_cached_counts_and_moves_the_epoch_even_for_none(
    tracker: ViewTracker, store: Store
) -> None:
    redis = tracker.redis
    for content_id in (7, 8):
        await set_db_count(store, "story", content_id, 10)
    assert await tracker.get_view_counts("story", [7, 8]) == {"7": 10, "8": 10}
    epoch = int(await redis.get("viewmw:epoch") or 0)

    await tracker.invalidate_database_counts([("story", "7")])
    assert await redis.mget("story:dbviews:7", "story:dbviews:8") == [None, b"10"]
    # With no content named, the database still changed: no fill begun before may be stored.
    await tracker.invalidate_database_counts([])
    assert int(await redis.get("viewmw:epoch") or 0) == epoch + 2


# Statistics -------------------------------------------------------------------------------------


async def test_abuse_stats_count_tracking_keys_with_scan(
    real_redis: aioredis.Redis, pg_store: Store, clock: FakeClock
) -> None:
    settings = Settings(key_prefix="app1:", timezone="Asia/Tokyo", **GENEROUS_DEADLINES)
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    other = ViewTracker(
        real_redis,
        pg_store,
        Settings(key_prefix="app2:", **GENEROUS_DEADLINES),
        clock=clock,
    )
    for viewer in ("user:1", "user:2", "user:3"):
        for content_id in (7, 8):
            assert (await tracker.track_view("story", content_id, viewer)).counted
    assert (await tracker.track_view("task", "t", "user:4")).counted
    assert not (await tracker.track_view("task", "t", "user:4")).counted  # adds no key
    await other.track_view("story", 7, "user:1")  # another app's keys are not counted
    await real_redis.set("unrelated:key", 1)
    await real_redis.set("app1:unrelated", 1)

    stats = await abuse_stats(real_redis, settings, pg_store)

    assert stats["pending_view_keys"] == 3
    assert stats["session_keys"] == 4  # one per viewer
    assert stats["daily_limit_keys"] == 4
    assert stats["dirty_contents"] == 3
    assert {key: stats[key] for key in ("max_views_per_session", "timezone")} == {
        "max_views_per_session": 3,
        "timezone": "Asia/Tokyo",
    }
    assert stats["max_daily_views_per_user"] == 100
    assert stats["view_cooldown_seconds"] == 300
    assert stats["one_view_per_day"] is True
    assert stats["session_seconds"] == 86400
    assert (await abuse_stats(real_redis, other.settings))["session_keys"] == 1


async def test_a_database_outage_leaves_counts_out_and_logs_once_a_minute(
    tracker: ViewTracker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert tracker.store is not None

    async def database_down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(tracker.store, "read_counts", database_down)
    for content_id in range(20):  # cache misses, each one needs the database
        result = await tracker.track_view("story", content_id, "user:1")
        assert result.counted and result.count is None
    assert await tracker.get_view_counts("story", [1, 2]) == {}
    lines = [r for r in caplog.records if "reading database counts failed" in r.getMessage()]
    assert len(lines) == 1


async def test_a_crowd_missing_one_content_shares_one_database_read(
    tracker: ViewTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[list[str]] = []
    original = Store.read_counts

    async def counted_read(self: Store, *args: Any, **kwargs: Any) -> Any:
        reads.append(list(args[1]))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "read_counts", counted_read)
    import asyncio

    results = await asyncio.gather(
        *(tracker.track_view("task", "crowd-1", f"user:{n}") for n in range(50))
    )
    assert all(result.counted for result in results)
    assert reads == [["crowd-1"]]
    # All 50 were decided in one batch before the count was read: each shows the count then.
    assert [result.count.total if result.count else None for result in results] == [50] * 50


async def test_counts_and_the_batches_committed_come_from_one_read(store: Store) -> None:
    started = datetime(2025, 11, 24, tzinfo=UTC)
    await store.commit_batch("b-one", started, {("task", "t1"): 3})
    await store.commit_batch("b-two", started, {("task", "t2"): 4})
    counts, committed = await store.read_counts_and_batches(
        "task", ["t1", "t2", "t3"], {"b-one", "b-two", "b-never"}
    )
    assert counts == {"t1": 3, "t2": 4, "t3": 0}
    assert committed == {"b-one", "b-two"}
    assert await store.read_counts_and_batches("task", ["t1"], set()) == ({"t1": 3}, set())
