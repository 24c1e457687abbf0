"""History reads on a real local Redis Cluster (tests/cluster_support.py): what the history suites
do not show on their own.

Rankings merged from shards that each hold many contents (each shard's list cut at its ``n``), the
number of script calls a read makes (one per content shard it needs, counted by the nodes
themselves), reads after the nodes lost their scripts, and the stats page on a cluster.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import LocalCluster
from tests.support import GENEROUS_DEADLINES, FakeClock
from viewmw import Limits, Period, Settings, Store, ViewStats, ViewSync, ViewTracker
from viewmw.health import HealthThresholds
from viewmw.keys import KeySchema
from viewmw.scripts import script_source
from viewmw.stats_page import StatsPage
from viewmw.stats_render import Unavailable

DAY = 86400
# Every rule off, so each view counts.
COUNT_ALL = Limits(
    max_views_per_session=None,
    max_daily_views_per_user=None,
    one_view_per_day=False,
    view_cooldown_seconds=None,
)


def _parts(
    cluster: LocalCluster,
    redis: RedisCluster,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    **changes: Any,
) -> tuple[ViewTracker, ViewSync, ViewStats]:
    settings = settings.replace(**{"redis_url": cluster.url, "limits": COUNT_ALL, **changes})
    client = cast(Redis, redis)  # typed for a single Redis' client; a cluster's answers the same
    tracker = ViewTracker(client, store, settings, clock=clock)
    sync = ViewSync(client, store, settings, clock=clock)
    return tracker, sync, ViewStats.from_tracker(tracker)


async def _views(
    tracker: ViewTracker, content_id: int, count: int, expected: Counter[str], first: int = 0
) -> None:
    """``count`` views of one content, by viewers ``first``, ``first + 1``, ..."""
    for n in range(first, first + count):
        assert (await tracker.track_view("story", content_id, f"user:{n}")).counted
    expected[str(content_id)] += count


def _ranked(expected: Counter[str]) -> list[tuple[str, int]]:
    return sorted(((i, v) for i, v in expected.items() if v), key=lambda item: (-item[1], item[0]))


async def _evalsha_calls(redis: RedisCluster) -> int:
    """EVALSHA commands the primaries have run since their statistics were reset."""
    stats = await redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
    return sum(int(node.get("cmdstat_evalsha", {}).get("calls", 0)) for node in stats.values())


async def test_top_merges_shards_whose_rankings_are_cut(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, pg_store: Store, clock: FakeClock
) -> None:
    """Three shards for 24 contents: each shard's ranking holds more ids than a round asks of
    it, so the shards' lists are cut and merged, with the history's leaders of three days."""
    tracker, sync, stats = _parts(
        redis_cluster,
        cluster_redis,
        pg_store,
        Settings(**GENEROUS_DEADLINES),
        clock,
        cluster_shards=3,
    )
    rng = random.Random(5)
    expected: Counter[str] = Counter()
    today: Counter[str] = Counter()
    for day in range(3):
        for content_id in rng.sample(range(1, 25), 16):
            views = rng.randint(1, 12)
            await _views(tracker, content_id, views, expected)
            if day == 2:
                today[str(content_id)] += views
        if day < 2:
            await sync.run()
            clock.advance(DAY)
    for limit in (1, 2, 3, 5, 8):
        assert await stats.top("story", Period.last_days(3), limit) == _ranked(expected)[:limit]
        assert await stats.top("story", Period.today(), limit) == _ranked(today)[:limit]
    await sync.run()  # all of it in the history now
    assert await stats.top("story", Period.last_days(3), 4) == _ranked(expected)[:4]


async def test_top_finds_a_content_behind_the_leaders_of_both_sides(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, pg_store: Store, clock: FakeClock
) -> None:
    """Yesterday (in the history) four leaders with 10 views, today (pending in Redis, over three
    shards) four others with 12; story 7 has 9 on each day, so it leads with 18, yet it is among
    neither side's first leaders: only the bound of both sides together sends the search wider."""
    tracker, sync, stats = _parts(
        redis_cluster,
        cluster_redis,
        pg_store,
        Settings(**GENEROUS_DEADLINES),
        clock,
        cluster_shards=3,
    )
    expected: Counter[str] = Counter()
    for content_id in (101, 102, 103, 104):
        await _views(tracker, content_id, 10, expected)
    await _views(tracker, 7, 9, expected)
    await sync.run()
    clock.advance(DAY)
    for content_id in (201, 202, 203, 204):
        await _views(tracker, content_id, 12, expected)
    await _views(tracker, 7, 9, expected, first=100)
    assert await stats.top("story", Period.last_days(2), 1) == [("7", 18)]
    assert await stats.top("story", Period.last_days(2), 2) == [("7", 18), ("201", 12)]


async def _eight_viewed(
    cluster: LocalCluster, redis: RedisCluster, store: Store, clock: FakeClock
) -> tuple[ViewTracker, ViewStats, list[str]]:
    """A tracker and stats on the cluster, and eight contents viewed once each (several shards)."""
    tracker, _, stats = _parts(cluster, redis, store, Settings(**GENEROUS_DEADLINES), clock)
    ids = [str(n) for n in range(1, 9)]
    for content_id in ids:
        await tracker.track_view("story", content_id, "user:1")
    return tracker, stats, ids


async def test_a_read_makes_one_call_per_shard_it_needs(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, pg_store: Store, clock: FakeClock
) -> None:
    tracker, stats, ids = await _eight_viewed(redis_cluster, cluster_redis, pg_store, clock)
    shards = {tracker.shards.index("story", i) for i in ids}
    assert len(shards) > 1
    period = Period.last_days(7)
    # Every script the reads use loaded on every node first: a node without one answers
    # NOSCRIPT, and the call is made again.
    await stats.views_many("story", ids, period)
    await stats.top("story", period, 3)

    await cluster_redis.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    counts = await stats.views_many("story", ids, period)
    assert {i: (c.views, c.unique_viewers) for i, c in counts.items()} == dict.fromkeys(ids, (1, 1))
    # read_days and count_viewers, once each per shard of the ids.
    assert await _evalsha_calls(cluster_redis) == 2 * len(shards)

    await cluster_redis.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    assert [d.views for d in await stats.by_day("story", "1", Period.last_days(3))] == [0, 0, 1]
    assert await _evalsha_calls(cluster_redis) == 2  # a content's days are in one shard

    await cluster_redis.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    ranked = await stats.top("story", period, 3)
    assert ranked == [("1", 1), ("2", 1), ("3", 1)]
    # Every shard's ranking, then once more each shard holding a candidate (8 contents: the
    # first round asks 12 of each shard, so all of them are candidates).
    assert await _evalsha_calls(cluster_redis) == tracker.shards.count + len(shards)


async def test_reads_load_the_scripts_a_node_lost(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, pg_store: Store, clock: FakeClock
) -> None:
    """A node that restarted has no scripts: the pipelined calls are sent again once loaded."""
    _, stats, ids = await _eight_viewed(redis_cluster, cluster_redis, pg_store, clock)
    await stats.views_many("story", ids, Period.today())
    await cluster_redis.script_flush()  # every primary

    counts = await stats.views_many("story", ids, Period.today())
    assert {i: c.views for i, c in counts.items()} == dict.fromkeys(ids, 1)
    await cluster_redis.script_flush()
    assert len(await stats.top("story", Period.today(), 20)) == len(ids)


async def test_the_stats_page_reads_every_panel_on_a_cluster(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, pg_store: Store, clock: FakeClock
) -> None:
    tracker, sync, stats = _parts(
        redis_cluster,
        cluster_redis,
        pg_store,
        Settings(**GENEROUS_DEADLINES),
        clock,
        limits=Limits(view_cooldown_seconds=60),
    )
    expected: Counter[str] = Counter()
    for content_id, views in ((1, 5), (2, 3), (3, 7)):
        await _views(tracker, content_id, views, expected)
    await sync.run()
    await _views(tracker, 2, 6, expected, first=100)  # pending: 9 views of story 2 in all
    for content_id in (1, 2):
        assert not (await tracker.track_view("story", content_id, "user:0")).counted  # cooldown

    # Generous deadlines: every check of a cluster's primaries answers, however busy the machine.
    page = await StatsPage(
        stats,
        tracker,
        content_types=["story"],
        panel_timeout=60.0,
        thresholds=HealthThresholds(timeout_seconds=30.0),
    ).read()

    assert not isinstance(page.health, Unavailable) and page.health.ok, page.health
    assert [cell.entries for cell in page.top] == [_ranked(expected)] * 2
    for blocked in page.blocked.values():
        assert not isinstance(blocked, Unavailable)
        assert blocked["cooldown"] == 2
    assert not isinstance(page.syncs, Unavailable) and len(page.syncs) == 3  # a batch per shard


async def test_read_days_answers_while_its_slot_moves_and_a_merged_sketch_it_lacks_is_missing(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster
) -> None:
    # While a slot moves, its node refuses a script's access to a key of the slot it does not
    # hold. A merged sketch is not among read_days' keys: one the node lacks must count as
    # missing (count_viewers, which names it, then makes it), not fail the whole read.
    keys = KeySchema(shard=5, shards=128)
    await cluster_redis.set(keys.epoch, 7)
    await cluster_redis.hset(keys.sync_batch, "started", 1)
    await cluster_redis.hset(keys.days("story", "1"), "2026-12-01", 3)
    slot = cluster_redis.keyslot(keys.epoch)
    source = redis_cluster.node_for_slot(slot)
    target = next(node for node in redis_cluster.nodes if node is not source)
    with redis_cluster.client(source) as from_node, redis_cluster.client(target) as to_node:
        source_id = from_node.execute_command("CLUSTER MYID").decode()
        target_id = to_node.execute_command("CLUSTER MYID").decode()
        to_node.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        from_node.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        try:
            reply = from_node.eval(
                script_source("read_days"),
                3,
                keys.epoch,
                keys.sync_batch,
                keys.days("story", "1"),
                keys.sync_batch_days_template,
                "1",
                "story:1",
                keys.merged_sketch_template("story", "1", "start", "2026-11-30"),
            )
        finally:
            for node in (from_node, to_node):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
    assert reply == [7, b"", b"2026-12-01=3", b"", 0]
