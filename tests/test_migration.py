"""Moving the rules' state from a single Redis to a real local Redis Cluster (viewmw.migration):
after the copy, the cluster decides every viewer's next view as the old Redis would have (the
session, cooldown, "viewed today" and daily limit carry over), the unique-viewer sketches and the
markers of events still waiting in the outbox are there under their new names, and a second copy
changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import LocalCluster, local_server
from tests.support import GENEROUS_DEADLINES, FakeClock
from viewmw import BlockReason, ConfigurationError, Limits, Settings, Store, ViewTracker
from viewmw.migration import KeyMigration, MigrationReport
from viewmw.outage.outbox import Outbox, OutboxEvent

LIMITS = Limits(max_daily_views_per_user=3, view_cooldown_seconds=300)


@pytest.fixture
async def old_redis() -> AsyncIterator[aioredis.Redis]:
    """The single Redis moved from: a server of the cluster's own build, since ``DUMP`` payloads
    travel only between compatible versions (the machine's Redis may be another server)."""
    with local_server() as url:
        client = aioredis.Redis.from_url(url)
        yield client
        await client.aclose()


async def test_a_viewer_is_decided_on_the_cluster_as_on_the_old_redis(
    old_redis: aioredis.Redis,
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    pg_store: Store,
    clock: FakeClock,
) -> None:
    old_settings = Settings(limits=LIMITS, unique_viewers=True, **GENEROUS_DEADLINES)
    new_settings = old_settings.replace(redis_url=redis_cluster.url)
    old = ViewTracker(old_redis, None, old_settings, clock=clock)
    new = ViewTracker(cast(aioredis.Redis, cluster_redis), None, new_settings, clock=clock)
    for content_id in ("1", "2", "3"):  # user:1 reaches the daily limit
        assert (await old.track_view("story", content_id, "user:1")).counted
    assert (await old.track_view("story", "1", "user:2")).counted
    outbox = Outbox(pg_store.engine)
    waiting = OutboxEvent.new("story", "9", "user:3", clock() - 60)
    gone = OutboxEvent.new("story", "8", "user:3", clock() - 60)
    assert await old.replay([waiting, gone]) == [True, True]
    assert await outbox.add(waiting)  # its replay died before the outbox forgot it
    await old.drain()
    # A session the old Redis still holds in the per-pair layout of earlier versions.
    await old_redis.hset(
        "viewed:user:5:story:3", mapping={"n": 1, "s": int(clock()) - 60, "l": int(clock()) - 60}
    )
    await old_redis.expire("viewed:user:5:story:3", 86_400)
    # A viewer the cluster saw already (web processes moved first): its sketch gets the old one.
    assert (await new.track_view("story", "1", "user:9")).counted

    migration = KeyMigration(
        old_redis,
        cluster_redis,
        old_settings.content_shards(),
        new_settings.content_shards(),
        outbox,
    )
    report = await migration.run()
    assert report == MigrationReport(
        sessions=7,
        daily_counters=3,
        sketches=4,
        sketches_merged=1,
        replay_markers=1,
        skipped_markers=1,
    )

    try:
        blocked = await new.track_view("story", "1", "user:2")
        assert (blocked.counted, blocked.reason) == (False, BlockReason.COOLDOWN)
        paired = await new.track_view("story", "3", "user:5")
        assert (paired.counted, paired.reason) == (False, BlockReason.COOLDOWN)
        over = await new.track_view("story", "4", "user:1")
        assert (over.counted, over.reason) == (False, BlockReason.DAILY_LIMIT)
        assert await new.replay([waiting]) == [None]  # decided once, on either side
        assert (await new.track_view("story", "4", "user:2")).counted
    finally:
        await new.drain()
    story_1 = new.shards.of("story", "1").uniques("story", "1", new.calendar_day_name())
    assert await cluster_redis.pfcount(story_1) == 3  # user:1 and user:2 before, user:9 after

    # Run again: everything is there already, nothing counted since the move is replaced, and
    # merging the sketches again changes none of them.
    again = await migration.run()
    assert again == MigrationReport(sketches_merged=5, already_there=7 + 3 + 1, skipped_markers=1)
    assert await cluster_redis.pfcount(story_1) == 3


async def test_keys_the_new_redis_cannot_read_are_refused_with_what_to_do(
    fake_redis: aioredis.Redis,
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
) -> None:
    # The embedded stand-in's DUMP payloads are its own: no Redis server reads them, as a server
    # cannot read those of a newer version.
    old_settings = Settings(limits=LIMITS, **GENEROUS_DEADLINES)
    old = ViewTracker(fake_redis, None, old_settings, clock=clock)
    assert (await old.track_view("story", "1", "user:1")).counted
    migration = KeyMigration(
        fake_redis,
        cluster_redis,
        old_settings.content_shards(),
        old_settings.replace(redis_url=redis_cluster.url).content_shards(),
    )
    with pytest.raises(ConfigurationError, match="same Redis version"):
        await migration.run()
