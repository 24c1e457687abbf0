"""Atomic rules: concurrent identical requests cannot both pass a rule that admits one.

Every test offers 200 views at once (``asyncio.gather``) to the real Redis, with the database
counts in the real PostgreSQL; once with the tracker's auto-pipelining (the default: concurrent
calls share pipelines) and once without it (every call its own ``EVALSHA``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from tests.support import REDIS_URL, FakeClock
from viewmw import BlockReason, Limits, Settings, Store, TrackResult, ViewTracker

N = 200


@pytest.fixture
async def pooled_redis(real_redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """A client on the real Redis (flushed by ``real_redis``) whose pool waits for a free
    connection. redis-py's default pool holds 100 connections and raises
    ``MaxConnectionsError`` when a 101st is needed at once, which 200 unpipelined calls do."""
    pool = aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=50, timeout=30)
    client = aioredis.Redis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.disconnect()


MakeTracker = Callable[..., ViewTracker]


@pytest.fixture(params=["pipelined", "unpipelined"])
def make_tracker(request: pytest.FixtureRequest, pg_store: Store, clock: FakeClock) -> MakeTracker:
    """Trackers on the real Redis and PostgreSQL, with or without auto-pipelining."""
    pipelining = request.param == "pipelined"
    # Pipelined calls share a few connections, so the default client (as users build it) does.
    client = request.getfixturevalue("real_redis" if pipelining else "pooled_redis")

    def make(limits: Limits | None = None) -> ViewTracker:
        settings = Settings(limits=limits or Limits())
        return ViewTracker(client, pg_store, settings, clock=clock, pipelining=pipelining)

    return make


async def offer(
    tracker: ViewTracker, views: list[tuple[str | int, str]], kind: str = "story"
) -> list[TrackResult]:
    """Offer every (content id, viewer) view at once."""
    return list(await asyncio.gather(*(tracker.track_view(kind, c, v) for c, v in views)))


def reasons(results: list[TrackResult]) -> Counter[BlockReason | None]:
    return Counter(result.reason for result in results)


async def test_200_identical_views_count_once(
    make_tracker: MakeTracker,
) -> None:
    tracker = make_tracker()
    results = await offer(tracker, [(7, "user:1")] * N)

    assert reasons(results) == {None: 1, BlockReason.COOLDOWN: N - 1}
    assert sum(result.counted for result in results) == 1
    # Every answer, counted or not, shows the one view (never 0, never 2).
    assert {result.count.total for result in results if result.count} == {1}
    assert int(await tracker.redis.get("story:views:7")) == 1
    assert await tracker.get_view_count("story", 7) == 1


async def test_200_viewers_count_200_times_each_seeing_its_own_increment(
    make_tracker: MakeTracker,
) -> None:
    tracker = make_tracker()
    assert await tracker.get_view_count("story", 7) == 0  # caches the database count (0)

    results = await offer(tracker, [(7, f"user:{n}") for n in range(N)])

    assert all(result.counted for result in results)
    assert int(await tracker.redis.get("story:views:7")) == N
    # With the database count cached, each answer is the count right after its own view: each
    # script ran alone, so the answers are exactly 1..200.
    assert sorted(result.count.total for result in results if result.count) == list(range(1, N + 1))
    assert await tracker.get_view_count("story", 7) == N


async def test_200_identical_views_with_only_a_session_limit_of_3_count_exactly_3(
    make_tracker: MakeTracker,
) -> None:
    limits = Limits(view_cooldown_seconds=0, max_views_per_session=3, one_view_per_day=False)
    tracker = make_tracker(limits)
    results = await offer(tracker, [(7, "user:1")] * N)

    assert reasons(results) == {None: 3, BlockReason.SESSION_LIMIT: N - 3}
    assert int(await tracker.redis.get("story:views:7")) == 3
    assert await tracker.get_view_count("story", 7) == 3


async def test_200_views_of_different_contents_stop_exactly_at_the_daily_limit(
    make_tracker: MakeTracker,
) -> None:
    tracker = make_tracker()  # 100 a day
    results = await offer(tracker, [(n, "user:1") for n in range(N)])

    assert reasons(results) == {None: 100, BlockReason.DAILY_LIMIT: N - 100}
    assert int(await tracker.redis.get("daily_views:user:1:2025-11-24")) == 100
    counted = {str(n) for n, result in enumerate(results) if result.counted}
    counts = await tracker.get_view_counts("story", list(range(N)))
    assert counts == {str(n): int(str(n) in counted) for n in range(N)}


async def test_20_viewers_each_sending_10_at_once_count_3_each(
    make_tracker: MakeTracker,
) -> None:
    limits = Limits(view_cooldown_seconds=None, max_views_per_session=3, one_view_per_day=False)
    tracker = make_tracker(limits)
    views: list[tuple[str | int, str]] = [(7, f"user:{n % 20}") for n in range(N)]
    results = await offer(tracker, views)

    per_viewer = Counter(viewer for (_, viewer), r in zip(views, results, strict=True) if r.counted)
    assert per_viewer == {f"user:{n}": 3 for n in range(20)}
    assert await tracker.get_view_count("story", 7) == 60
