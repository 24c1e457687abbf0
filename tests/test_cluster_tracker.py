"""The tracker on a real local Redis Cluster (tests/cluster_support.py): views of many content
shards decided concurrently and conserved, counts read across shards, replays decided once, and a
dead primary failing only the views of the shards it serves."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests.cluster_support import LocalCluster, local_cluster
from tests.support import FakeClock
from viewmw import Limits, Settings, Store, TrackResult, ViewTracker
from viewmw.assembly import connect_redis_cluster
from viewmw.errors import MalformedReplyError
from viewmw.keys import viewer_shard
from viewmw.outage.outbox import OutboxEvent

DAY = "2025-11-24"  # FakeClock's day


def _settings(cluster: LocalCluster, **limits: Any) -> Settings:
    # A generous deadline: a busy machine must not turn these replies into late ones (their
    # own tests are elsewhere), and a cluster client's first call learns the nodes.
    return Settings(redis_url=cluster.url, limits=Limits(**limits), redis_timeout=10.0)


def _tracker(redis: RedisCluster, settings: Settings, clock: FakeClock) -> ViewTracker:
    # The tracker is typed for a single Redis' client; a cluster's answers the commands it uses.
    return ViewTracker(cast(Redis, redis), None, settings, clock=clock)


async def _pending(redis: RedisCluster, tracker: ViewTracker, content_id: str) -> int:
    key = tracker.shards.of("story", content_id).pending("story", content_id)
    return int(await redis.get(key) or 0)


async def test_concurrent_views_over_many_shards_are_conserved_and_limited(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, clock: FakeClock
) -> None:
    settings = _settings(
        redis_cluster,
        max_daily_views_per_user=5,
        view_cooldown_seconds=None,
        max_views_per_session=2,
        one_view_per_day=False,
    )
    tracker = _tracker(cluster_redis, settings, clock)
    random.seed(7)
    offers = [(f"user:{random.randrange(12)}", str(random.randrange(60))) for _ in range(600)]
    try:
        results = await asyncio.gather(
            *(tracker.track_view("story", content, viewer) for viewer, content in offers)
        )
        await tracker.drain()
    finally:
        await tracker.drain()
    assert len({tracker.shards.index("story", content) for _, content in offers}) > 20

    counted = Counter(content for (_, content), r in zip(offers, results, strict=True) if r.counted)
    by_viewer = Counter(viewer for (viewer, _), r in zip(offers, results, strict=True) if r.counted)
    # Every counted view is pending in its shard, and nothing else is.
    for content in {content for _, content in offers}:
        assert await _pending(cluster_redis, tracker, content) == counted[content]
    # The daily limit held for every viewer, and the quota holds exactly the views counted (the
    # places of views a content rule blocked were all given back).
    keys = tracker.shards.schemas[0]
    for viewer in {viewer for viewer, _ in offers}:
        assert by_viewer[viewer] <= 5
        held = int(await cluster_redis.hget(keys.daily_views(viewer, DAY), "n") or 0)
        assert held == by_viewer[viewer]
    # Counts read across every shard at once agree, in the order asked.
    ids = [str(n) for n in range(60)]
    counts = await tracker.get_view_counts("story", ids)
    assert list(counts) == ids
    assert counts == {content: counted[content] for content in ids}


async def test_a_replayed_event_is_decided_once_on_a_cluster(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, clock: FakeClock
) -> None:
    tracker = _tracker(cluster_redis, _settings(redis_cluster), clock)
    events = [OutboxEvent.new("story", str(n), f"anon:v{n}", clock() - 60) for n in range(30)]
    assert await tracker.replay(events) == [True] * 30
    assert await tracker.replay(events) == [None] * 30  # a replayer that died and ran again
    assert await tracker.get_view_counts("story", [str(n) for n in range(30)]) == {
        str(n): 1 for n in range(30)
    }
    await tracker.drain()


async def test_a_dead_primary_fails_only_the_views_of_its_shards(clock: FakeClock) -> None:
    with local_cluster(persistent=True) as cluster:
        settings = _settings(cluster, view_cooldown_seconds=None)
        redis = connect_redis_cluster(settings)
        tracker = _tracker(redis, settings, clock)
        try:
            ids = [str(n) for n in range(40)]
            first = await _offer(tracker, ids, "user:1")
            assert all(isinstance(r, TrackResult) and r.counted for r in first)
            dead = cluster.nodes[0]
            on_dead = {
                content_id
                for content_id in ids
                if cluster.node_for_slot(
                    redis.keyslot(tracker.shards.of("story", content_id).epoch)
                )
                is dead
            }
            # user:2's daily places must be on a live node, or every one of its views fails.
            viewer = next(
                f"user:{n}"
                for n in range(2, 100)
                if cluster.node_for_slot(
                    redis.keyslot(tracker.shards.schemas[0].daily_views(f"user:{n}", DAY))
                )
                is not dead
            )
            assert 0 < len(on_dead) < len(ids)
            cluster.kill(dead)

            outcomes = await _offer(tracker, ids, viewer)
            for content_id, outcome in zip(ids, outcomes, strict=True):
                if content_id in on_dead:
                    assert isinstance(outcome, RedisError), (content_id, outcome)
                else:
                    assert isinstance(outcome, TrackResult) and outcome.counted

            cluster.restart(dead)
            await tracker.drain()
            # The views of live shards were counted once; the dead node's got none.
            counts = await _counts_when_back(tracker, ids)
            assert counts == {i: 1 if i in on_dead else 2 for i in ids}
        finally:
            await tracker.drain()
            await redis.aclose()


async def test_a_shard_whose_reply_cannot_be_read_fails_only_its_own_views(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracker = _tracker(cluster_redis, _settings(redis_cluster, view_cooldown_seconds=None), clock)
    ids = [str(n) for n in range(40)]
    broken = tracker.shards.of("story", "0").epoch  # the second key of its shard's calls
    evalsha = cluster_redis.evalsha

    async def garbled(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        reply = await evalsha(sha, numkeys, *keys_and_args)  # the script ran: views counted
        if sha == tracker.scripts.record_views.sha and keys_and_args[1] == broken:
            return ["not", "a", "reply"]
        return reply

    monkeypatch.setattr(cluster_redis, "evalsha", garbled)
    try:
        outcomes = await _offer(tracker, ids, "user:1")
    finally:
        await tracker.drain()
    on_broken = {i for i in ids if tracker.shards.of("story", i).epoch == broken}
    assert 0 < len(on_broken) < len(ids)
    for content_id, outcome in zip(ids, outcomes, strict=True):
        if content_id in on_broken:
            assert isinstance(outcome, MalformedReplyError), (content_id, outcome)
        else:  # decided on their own shards, whatever another shard answered
            assert isinstance(outcome, TrackResult) and outcome.counted, (content_id, outcome)


async def test_a_slow_shard_holds_back_only_its_own_views(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One batch's views go to their shards in separate calls: the views of the healthy shards
    are answered while one shard's call is still stalled, and the stalled ones once it is back,
    each counted once."""
    tracker = _tracker(cluster_redis, _settings(redis_cluster, view_cooldown_seconds=None), clock)
    ids = [str(n) for n in range(40)]
    slow = tracker.shards.of("story", "0").epoch  # the second key of its shard's calls
    back = asyncio.Event()
    evalsha = cluster_redis.evalsha

    async def stalling(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == tracker.scripts.record_views.sha and keys_and_args[1] == slow:
            await back.wait()
        return await evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(cluster_redis, "evalsha", stalling)
    on_slow = {i for i in ids if tracker.shards.of("story", i).epoch == slow}
    assert 0 < len(on_slow) < len(ids)
    views = {i: asyncio.ensure_future(tracker.track_view("story", i, "user:1")) for i in ids}
    try:
        async with asyncio.timeout(30):  # held back with the slow shard, they would never come
            answered = await asyncio.gather(*(views[i] for i in ids if i not in on_slow))
        assert all(result.counted for result in answered), answered
        assert not any(views[i].done() for i in on_slow)
    finally:
        back.set()
        stalled = await asyncio.gather(*(views[i] for i in on_slow), return_exceptions=True)
        await tracker.drain()
    assert all(isinstance(r, TrackResult) and r.counted for r in stalled), stalled
    for content_id in ids:
        assert await _pending(cluster_redis, tracker, content_id) == 1


async def test_a_viewer_shard_that_cannot_reserve_fails_only_its_viewers_views(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(redis_cluster, view_cooldown_seconds=None, max_daily_views_per_user=50)
    tracker = _tracker(cluster_redis, settings, clock)
    shards = tracker.shards.schemas[0].shards
    viewers = [f"user:{n}" for n in range(1, 40)]
    failing = viewer_shard(viewers[0], shards)
    daily_key_of_failing = tracker.shards.schemas[0].daily_views(viewers[0], DAY)
    assert any(viewer_shard(viewer, shards) != failing for viewer in viewers)
    evalsha = cluster_redis.evalsha

    async def refusing(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == tracker.scripts.reserve_daily.sha and (
            cluster_redis.keyslot(keys_and_args[0]) == cluster_redis.keyslot(daily_key_of_failing)
        ):
            raise RedisConnectionError("the node of this viewer shard is gone")
        return await evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(cluster_redis, "evalsha", refusing)
    try:
        outcomes = await asyncio.gather(
            *(tracker.track_view("story", "7", viewer) for viewer in viewers),
            return_exceptions=True,
        )
    finally:
        await tracker.drain()
    failed = {viewer for viewer in viewers if viewer_shard(viewer, shards) == failing}
    for viewer, outcome in zip(viewers, outcomes, strict=True):
        if viewer in failed:
            assert isinstance(outcome, RedisConnectionError), (viewer, outcome)
        else:
            assert isinstance(outcome, TrackResult) and outcome.counted, (viewer, outcome)
    # A view whose place could not be reserved was not decided, so it is not pending either.
    assert await _pending(cluster_redis, tracker, "7") == len(viewers) - len(failed)


async def test_a_view_sent_alone_is_decided_whole_after_its_request_stopped_waiting(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The deadline passes between the reservation of the daily place and the decision: the
    # view must still be decided, and a place a content rule blocked given back.
    settings = Settings(
        redis_url=redis_cluster.url,
        limits=Limits(view_cooldown_seconds=None, max_daily_views_per_user=5),
        redis_timeout=0.05,
    )
    tracker = ViewTracker(cast(Redis, cluster_redis), None, settings, clock=clock, pipelining=False)
    stopped_waiting = asyncio.Event()
    evalsha = cluster_redis.evalsha

    async def decided_late(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == tracker.scripts.record_views.sha:
            await stopped_waiting.wait()
        return await evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(cluster_redis, "evalsha", decided_late)
    held_key = tracker.shards.schemas[0].daily_views("user:1", DAY)
    try:
        for _view in range(2):  # counted, then blocked by "one view per content per day"
            with pytest.raises(TimeoutError):
                await tracker.track_view("story", "7", "user:1")
            stopped_waiting.set()
            await tracker.drain()
            stopped_waiting.clear()
    finally:
        stopped_waiting.set()
        await tracker.drain()
    assert await _pending(cluster_redis, tracker, "7") == 1
    assert int(await cluster_redis.hget(held_key, "n") or 0) == 1


async def test_a_cold_list_over_many_shards_reads_the_database_once_for_all(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    pg_store: Store,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [f"t{n}" for n in range(40)]
    tracker = await _stored_tracker(
        redis_cluster, cluster_redis, pg_store, clock, {i: n + 1 for n, i in enumerate(ids)}
    )
    reads: list[int] = []
    original = pg_store.read_counts

    async def counted_read(content_type: str, content_ids: Any, batch_id: str = "") -> Any:
        reads.append(len(content_ids))
        return await original(content_type, content_ids, batch_id)

    monkeypatch.setattr(pg_store, "read_counts", counted_read)
    assert len({tracker.shards.index("task", i) for i in ids}) > 20
    try:
        # Every count of a cold page, though its ids are in more shards than reads may run at
        # once: one database read for all of them, each shard's counts then cached in its slot.
        assert await tracker.get_view_counts("task", ids) == {i: n + 1 for n, i in enumerate(ids)}
        assert reads == [len(ids)]
        assert await tracker.get_view_counts("task", ids) == {i: n + 1 for n, i in enumerate(ids)}
        assert reads == [len(ids)]  # cached: no SQL
    finally:
        await tracker.drain()


async def test_a_shard_that_cannot_store_its_counts_leaves_out_only_its_own(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    pg_store: Store,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [f"t{n}" for n in range(40)]
    tracker = await _stored_tracker(
        redis_cluster, cluster_redis, pg_store, clock, dict.fromkeys(ids, 5)
    )
    broken = tracker.shards.of("task", "t0").epoch  # the first key of its shard's fill
    evalsha = cluster_redis.evalsha

    async def one_node_fails(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == tracker.scripts.fill_cache.sha and keys_and_args[0] == broken:
            raise RedisConnectionError("the node of this shard went away")
        return await evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(cluster_redis, "evalsha", one_node_fails)
    try:
        counts = await tracker.get_view_counts("task", ids)
    finally:
        await tracker.drain()
    on_broken = {i for i in ids if tracker.shards.of("task", i).epoch == broken}
    assert counts == {i: 5 for i in ids if i not in on_broken}
    assert tracker.database_breaker.is_closed  # the database answered


async def _stored_tracker(
    cluster: LocalCluster,
    redis: RedisCluster,
    store: Store,
    clock: FakeClock,
    counts: dict[str, int],
) -> ViewTracker:
    """A tracker on the cluster and ``store``, whose database holds ``counts`` of ``task`` ids
    (none of them cached in Redis yet)."""
    started = datetime(2025, 11, 24, tzinfo=UTC)
    await store.commit_batch("seed", started, {("task", i): n for i, n in counts.items()})
    settings = _settings(cluster).replace(database_request_timeout=10.0)
    return ViewTracker(cast(Redis, redis), store, settings, clock=clock)


async def _offer(
    tracker: ViewTracker, ids: list[str], viewer: str
) -> list[TrackResult | BaseException]:
    return await asyncio.gather(
        *(tracker.track_view("story", content_id, viewer) for content_id in ids),
        return_exceptions=True,
    )


async def _counts_when_back(tracker: ViewTracker, ids: list[str]) -> dict[str, int]:
    """Counts once the restarted node answers again (its first command on a pooled connection
    may fail: the client never resends)."""
    for _attempt in range(20):
        try:
            return await tracker.get_view_counts("story", ids)
        except RedisError:
            await asyncio.sleep(0.1)
    pytest.fail("the restarted primary did not answer again")
