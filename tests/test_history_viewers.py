"""Distinct viewers per day (HyperLogLog), crawler views counted apart, blocked views by reason.

Real Redis with PostgreSQL and SQLite; the exact-for-small-counts case also on fakeredis, whose
HyperLogLogs cannot be read back as sketches (the history then keeps the estimate alone). The
reads whose path differs on a Redis Cluster (estimates within the error, many contents' sketches
merged each in its own shard, blocked views summed over shards, the widening ranking) also run on
a real local cluster with PostgreSQL, with the default number of content shards.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import date, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from tests.support import FakeClock
from viewmw import Limits, Period, Settings, Store, ViewStats, ViewSync, ViewTracker, daily_views
from viewmw.keys import KeySchema

DAY = 86400
# Redis' HyperLogLog: a standard error of 0.81 %; three of them bound nearly every estimate.
ERROR_BOUND = 3 * 0.0081


@pytest.fixture(params=["redis", "cluster"])
def redis_backend(
    request: pytest.FixtureRequest, settings: Settings
) -> tuple[aioredis.Redis, Settings]:
    """The real Redis, and a real local Redis Cluster (its URL in the settings)."""
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return request.getfixturevalue("cluster_redis"), settings.replace(redis_url=cluster.url)
    return request.getfixturevalue("real_redis"), settings


@pytest.fixture(params=["redis-postgresql", "redis-sqlite", "cluster-postgresql"])
def backend(request: pytest.FixtureRequest, settings: Settings) -> tuple[Any, Store, Settings]:
    """The real Redis with PostgreSQL and with SQLite, and a real local Redis Cluster with
    PostgreSQL: a client, a store and the settings that name the cluster."""
    redis_name, database = request.param.split("-")
    store = request.getfixturevalue("pg_store" if database == "postgresql" else "sqlite_store")
    if redis_name == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        redis = request.getfixturevalue("cluster_redis")
        return redis, store, settings.replace(redis_url=cluster.url)
    return request.getfixturevalue("real_redis"), store, settings


def make(
    redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock, **changes: object
) -> tuple[ViewTracker, ViewSync, ViewStats]:
    settings = settings.replace(**changes)
    tracker = ViewTracker(redis, store, settings, clock=clock)
    sync = ViewSync(redis, store, settings, clock=clock)
    return tracker, sync, ViewStats.from_tracker(tracker)


async def offer(tracker: ViewTracker, content_id: int, viewers: range) -> int:
    """Each viewer views the content (concurrently, so they travel in shared batches)."""
    counted = 0
    for start in range(0, len(viewers), 500):
        results = await asyncio.gather(
            *(
                tracker.track_view("story", content_id, f"user:{v}")
                for v in viewers[start : start + 500]
            )
        )
        counted += sum(result.counted for result in results)
    return counted


async def five_days(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> tuple[ViewTracker, ViewSync, ViewStats]:
    """Content n viewed on the last n + 1 of five days (5 viewers a day, 2 of them new), a
    retention of one day: most days' viewers are in the history's sketches alone."""
    tracker, sync, stats = make(*backend, clock, history_retention_days=1)
    for day in range(5):
        for n in range(1, 5):
            if day >= 4 - n:
                await offer(tracker, n, range(2 * day, 2 * day + 5))
        await sync.run()
        clock.advance(DAY)
    clock.advance(-DAY)
    await offer(tracker, 1, range(100, 103))  # pending today
    await offer(tracker, 9, range(3))  # only pending
    return tracker, sync, stats


async def three_overlapping_days(
    redis: Any, store: Store, settings: Settings, clock: FakeClock
) -> tuple[ViewTracker, ViewSync, ViewStats]:
    """Content 1 viewed by 30 viewers on each of three days, 10 of them new each day (50 in
    all), each day synced; a retention of one day. The clock ends on the last day."""
    tracker, sync, stats = make(redis, store, settings, clock, history_retention_days=1)
    for day in range(3):
        await offer(tracker, 1, range(10 * day, 10 * day + 30))
        await sync.run()
        clock.advance(DAY)
    clock.advance(-DAY)
    return tracker, sync, stats


def spy_on_sketches(stats: ViewStats) -> list[date | None]:
    """Each history statement's ``sketches_before`` (``None``: no sketch read)."""
    history = stats._history
    assert history is not None
    asked: list[date | None] = []
    totals = history.totals

    async def spied(*args: Any, sketches_before: date | None) -> Any:
        asked.append(sketches_before)
        return await totals(*args, sketches_before=sketches_before)

    history.totals = spied  # type: ignore[method-assign]
    return asked


async def test_small_counts_are_exact_and_days_merge(
    any_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    redis = any_redis
    tracker, sync, stats = make(redis, sqlite_store, settings, clock)
    for n in (1, 2, 7, 30):
        await offer(tracker, n, range(n))
        await offer(tracker, n, range(n))  # the same viewers again: blocked, counted once
        assert (await stats.views("story", n, Period.today())).unique_viewers == n
    await sync.run()
    for n in (1, 2, 7, 30):
        count = await stats.views("story", n, Period.today())
        assert (count.views, count.unique_viewers) == (n, n)

    # The same 30 viewers on two more days, synced each day: 30 across the three days.
    for _ in range(2):
        clock.advance(DAY)
        await offer(tracker, 30, range(30))
        await sync.run()
    assert (await stats.views("story", 30, Period.last_days(3))).unique_viewers == 30
    days = await stats.by_day("story", 30, Period.last_days(3))
    assert [(d.views, d.unique_viewers) for d in days] == [(30, 30)] * 3


async def test_ten_thousand_viewers_within_the_stated_error(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> None:
    tracker, sync, stats = make(*backend, clock)
    await offer(tracker, 1, range(10_000))
    clock.advance(DAY)
    await offer(tracker, 1, range(5_000, 15_000))  # half of them again, half new
    live = await stats.views("story", 1, Period.last_days(2))
    await sync.run()
    synced = await stats.views("story", 1, Period.last_days(2))
    for estimate in (live.unique_viewers, synced.unique_viewers):
        assert estimate is not None and abs(estimate - 15_000) <= ERROR_BOUND * 15_000, estimate
    assert synced.views == live.views == 20_000
    days = await stats.by_day("story", 1, Period.last_days(2))
    for day in days:
        assert day.unique_viewers is not None
        assert abs(day.unique_viewers - 10_000) <= ERROR_BOUND * 10_000, day


async def test_unique_viewers_can_be_switched_off(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    tracker, sync, stats = make(real_redis, sqlite_store, settings, clock, unique_viewers=False)
    await offer(tracker, 1, range(5))
    count = await stats.views("story", 1, Period.today())
    assert (count.views, count.unique_viewers) == (5, None)
    assert [key async for key in real_redis.scan_iter(match="*:uniq:*")] == []
    await sync.run()
    async with sqlite_store.engine.connect() as connection:
        stored = (await connection.execute(select(daily_views.c.unique_viewers))).scalars().all()
    assert stored == [None]


async def test_crawler_views_are_counted_apart(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    tracker, sync, stats = make(real_redis, store, settings, clock)
    for _ in range(3):
        await tracker.track_crawler_view("story", 9)  # a content no person viewed
        await tracker.track_crawler_view("story", 1)
    await offer(tracker, 1, range(2))

    for moment in ("pending", "synced"):
        count = await stats.views("story", 1, Period.today())
        assert (count.views, count.crawler_views) == (2, 3), moment
        assert (await stats.views("story", 9, Period.today())).crawler_views == 3, moment
        assert await tracker.get_view_counts("story", [1, 9]) == {"1": 2, "9": 0}, moment
        assert await stats.top("story", Period.today()) == [("1", 2)], moment
        await sync.run()
    async with store.engine.connect() as connection:
        rows = await connection.execute(
            select(daily_views.c.content_id, daily_views.c.views, daily_views.c.crawler_views)
        )
        assert sorted(rows) == [("1", 2, 3), ("9", 0, 3)]


async def test_blocked_views_are_counted_by_reason_and_day(
    redis_backend: tuple[aioredis.Redis, Settings], clock: FakeClock
) -> None:
    redis, settings = redis_backend
    settings = settings.replace(limits=Limits(max_views_per_session=None, view_cooldown_seconds=60))
    tracker = ViewTracker(redis, None, settings, clock=clock)
    stats = ViewStats.from_tracker(tracker)
    await tracker.track_view("story", 1, "user:1")
    await tracker.track_view("story", 1, "user:1")  # cooldown
    clock.advance(120)
    await tracker.track_view("story", 1, "user:1")  # viewed today
    clock.advance(DAY)
    await tracker.track_view("story", 1, "user:1")
    await tracker.track_view("story", 1, "user:1")  # cooldown, the next day
    await tracker.track_view("story", 2, "user:1")
    await tracker.track_view("story", 2, "user:1")  # cooldown, of a content in another shard

    assert await stats.blocked(Period.today()) == {
        "cooldown": 2,
        "viewed_today": 0,
        "session_limit": 0,
        "daily_limit": 0,
    }
    assert await stats.blocked(Period.last_days(2)) == {
        "cooldown": 3,
        "viewed_today": 1,
        "session_limit": 0,
        "daily_limit": 0,
    }
    yesterday = stats.today() - timedelta(days=1)
    assert (await stats.blocked(Period.between(yesterday, yesterday)))["viewed_today"] == 1


async def test_days_past_the_retention_merge_from_the_sketches_in_the_history(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    """Overlapping viewers on three days; the oldest day's HyperLogLog comes from the history
    (its Redis key is past the retention of one day), the others from Redis."""
    _, _, stats = await three_overlapping_days(real_redis, store, settings, clock)
    count = await stats.views("story", 1, Period.last_days(3))
    assert (count.views, count.unique_viewers) == (90, 50)  # 50 different viewers, not 90
    assert (await stats.views("story", 1, Period.last_days(1))).unique_viewers == 30
    # All time has no first day: the kept sketches are read all the same.
    ever = await stats.views("story", 1, Period.all_time())
    assert (ever.views, ever.unique_viewers) == (90, 50)


async def test_many_contents_merge_their_own_sketches_only(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> None:
    """Contents with different numbers of days kept as sketches (past a retention of one day)
    and live days, read together: each content's viewers are merged from its own days alone,
    though the read shares its scratch keys between the contents (of a shard, on a cluster),
    and none is left behind."""
    redis = backend[0]
    _, _, stats = await five_days(backend, clock)

    counts = await stats.views_many("story", [1, 2, 3, 4, 9, 10], Period.last_days(5))
    expected_viewers = {"1": 10, "2": 9, "3": 11, "4": 13, "9": 3, "10": 0}
    assert {i: c.unique_viewers for i, c in counts.items()} == expected_viewers
    assert {i: c.views for i, c in counts.items()} == {
        "1": 13,
        "2": 15,
        "3": 20,
        "4": 25,
        "9": 3,
        "10": 0,
    }
    days = await stats.by_day("story", 4, Period.last_days(5))
    assert [(d.views, d.unique_viewers) for d in days] == [(5, 5)] * 5
    assert [key async for key in redis.scan_iter(match="*scratch*")] == []

    # Views alone: the same counts, no estimate, and neither a sketch read nor a merge.
    asked = spy_on_sketches(stats)
    stats.scripts = dataclasses.replace(stats.scripts, count_viewers=None)  # a merge would fail
    views_only = await stats.views_many(
        "story", [1, 2, 3, 4, 9, 10], Period.last_days(5), unique_viewers=False
    )
    assert {i: (c.views, c.unique_viewers) for i, c in views_only.items()} == {
        i: (c.views, None) for i, c in counts.items()
    }
    assert asked == [None]
    assert (await stats.views("story", 4, Period.last_days(5), unique_viewers=False)).views == 25


async def test_every_viewers_key_expires_when_repeat_viewers_skip_the_expiry(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    """A viewer already in a day's HyperLogLog sets no expiry again; the key has had one since
    it was created, also when unique viewers were switched on after views of that day."""
    off, _, _ = make(real_redis, sqlite_store, settings, clock, unique_viewers=False)
    tracker, _, _ = make(real_redis, sqlite_store, settings, clock)
    await offer(off, 1, range(3))  # counted while unique viewers were off: no HyperLogLog
    await offer(tracker, 1, range(3, 6))
    await offer(tracker, 1, range(6))  # blocked: all of them are in it already
    await offer(tracker, 2, range(4))
    keys = [key async for key in real_redis.scan_iter(match="*:uniq:*")]
    assert len(keys) == 2
    for key in keys:
        ttl = await real_redis.ttl(key)
        assert ttl > settings.history_retention_days * DAY - DAY, (key, ttl)


async def test_the_viewers_key_template_filled_in_lua_gives_the_schema_key(
    real_redis: aioredis.Redis,
) -> None:
    fill = real_redis.register_script("return string.format(ARGV[1], unpack(ARGV, 2))")
    for prefix in ["", "app1:", "100%:", "%s%d%%:"]:
        keys = KeySchema(prefix)
        filled = await fill(args=[keys.uniques_template, "story", "2026-11-30", "x-1"])
        assert filled.decode() == keys.uniques("story", "x-1", "2026-11-30"), prefix


async def test_reads_under_a_prefix_with_format_characters(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    tracker, sync, stats = make(real_redis, store, settings, clock, key_prefix="100%s%%:")
    await offer(tracker, 1, range(4))
    await sync.run()
    await offer(tracker, 1, range(2, 6))  # 2 of them again (blocked), 2 new, pending
    await offer(tracker, 2, range(3))
    count = await stats.views("story", 1, Period.today())
    assert (count.views, count.unique_viewers) == (6, 6)
    assert await stats.top("story", Period.today()) == [("1", 6), ("2", 3)]
    days = await stats.by_day("story", 2, Period.today())
    assert [(d.views, d.unique_viewers) for d in days] == [(3, 3)]


async def test_top_widens_until_no_id_outside_the_day_lists_can_lead(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> None:
    """Each day has its own four leaders with 10 views; a steady content with 9 views a day is
    never among any day's leaders (the first round's lists are cut at 4 per day for a limit of
    1), yet it leads the three days: the search has to widen to find it."""
    tracker, sync, stats = make(*backend, clock)
    for day in range(3):
        for leader in range(4):
            await offer(tracker, 100 + 10 * day + leader, range(10))
        await offer(tracker, 7, range(9))
        await sync.run()
        clock.advance(DAY)
    clock.advance(-DAY)
    assert await stats.top("story", Period.last_days(3), 1) == [("7", 27)]
    assert await stats.top("story", Period.last_days(3), 2) == [("7", 27), ("100", 10)]
    assert await stats.top("story", Period.today(), 1) == [("120", 10)]
