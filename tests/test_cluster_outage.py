"""A primary of a real local Redis Cluster killed with SIGKILL and restarted, under the outage
path (tests/cluster_support.py, viewmw.outage): the views its shards could not take are either
refused as unknown (before the breaker opens) or kept in the outbox, and after the restart the
replay and a sync on the cluster bring the database to exactly the views counted and kept."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterCrossSlotError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from tests.cluster_support import LocalCluster, LocalNode, local_cluster
from tests.support import FakeClock
from viewmw import Limits, Settings, Store, ViewSync, ViewTracker
from viewmw.assembly import connect_redis_cluster
from viewmw.failures import FailureKind, classify
from viewmw.node_connections import NodeConnections
from viewmw.outage.breaker import BreakerState, CircuitBreaker
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox
from viewmw.outage.probe import RedisProbe
from viewmw.outage.replayer import Replayer, ReplayReport

# Every rule off: each view offered is counted once decided, so the expected counts are exact.
EVERY_VIEW = Limits(
    max_views_per_session=None,
    max_daily_views_per_user=None,
    one_view_per_day=False,
    view_cooldown_seconds=None,
)


@dataclass
class OutagePath:
    """A :class:`ResilientTracker` on a local cluster, with the outbox in PostgreSQL and every
    rule off, and the clocks of its breakers (the process's; each primary's on node
    connections)."""

    settings: Settings
    redis: RedisCluster
    nodes: NodeConnections | None
    tracker: ViewTracker
    outbox: Outbox
    resilient: ResilientTracker
    breaker_clock: FakeClock = field(default_factory=lambda: FakeClock(now=0.0))
    node_clock: FakeClock | None = None


@asynccontextmanager
async def outage_path(
    cluster: LocalCluster, store: Store, clock: FakeClock, *, node_connections: bool
) -> AsyncIterator[OutagePath]:
    """An :class:`OutagePath` whose views go on node connections (as a built tracker's do) or
    through redis-py's cluster client; closed on the way out."""
    settings = Settings(
        redis_url=cluster.url, limits=EVERY_VIEW, redis_timeout=5.0, database_request_timeout=5.0
    )
    redis = connect_redis_cluster(settings)
    node_clock = FakeClock(now=0.0) if node_connections else None
    nodes = NodeConnections(redis, reply_timeout=5.0, clock=node_clock) if node_clock else None
    tracker = ViewTracker(cast(Redis, redis), store, settings, clock=clock, script_connection=nodes)
    outbox = Outbox(store.engine)
    breaker_clock = FakeClock(now=0.0)
    resilient = ResilientTracker(
        tracker,
        outbox,
        breaker=CircuitBreaker(failure_threshold=3, clock=breaker_clock),
        probe=RedisProbe(None),
    )
    try:
        yield OutagePath(
            settings, redis, nodes, tracker, outbox, resilient, breaker_clock, node_clock
        )
    finally:
        await resilient.aclose()
        await tracker.drain()
        if nodes is not None:
            await nodes.aclose()
        await redis.aclose()


async def _counted_once_each(
    path: OutagePath, cluster: LocalCluster, ids: list[str], expected: Counter[str]
) -> tuple[LocalNode, list[str], list[str]]:
    """One view of each of ``ids``, counted; then the primary to kill, and the ids whose shards
    it serves and the others."""
    for content_id in ids:
        assert (await path.resilient.track_view("story", content_id, "user:1")).counted
        expected[content_id] += 1
    dead = cluster.nodes[0]
    shards = path.tracker.shards
    on_dead = [
        i
        for i in ids
        if cluster.node_for_slot(path.redis.keyslot(shards.of("story", i).epoch)) is dead
    ]
    return dead, on_dead, [i for i in ids if i not in on_dead]


def test_a_cluster_clients_own_refusals_are_redis_failures() -> None:
    # Not RedisErrors in redis-py, but the breaker must count them, not raise them to a page.
    assert classify(SlotNotCoveredError("slot 42 is not covered")) is FailureKind.REDIS
    assert classify(ClusterDownError("CLUSTERDOWN")) is FailureKind.REDIS
    unreachable = "Redis Cluster cannot be connected. Please provide at least one reachable node"
    assert classify(RedisClusterException(unreachable)) is FailureKind.REDIS


def test_keys_of_several_slots_in_one_call_surface_as_a_bug() -> None:
    # A call the client refuses to route is viewmw's mistake, not an outage: it must not open
    # the breaker and send every view to the outbox.
    routing = RedisClusterException("EVALSHA - all keys must map to the same key slot")
    assert classify(routing) is FailureKind.UNEXPECTED
    assert classify(ClusterCrossSlotError("CROSSSLOT Keys in request")) is FailureKind.UNEXPECTED
    plain_reply = ResponseError("CROSSSLOT Keys in request don't hash to the same slot")
    assert classify(plain_reply) is FailureKind.UNEXPECTED


async def test_a_killed_primary_loses_nothing_the_outage_path_kept(
    pg_store: Store, clock: FakeClock
) -> None:
    # Views through redis-py's cluster client (as over TLS): no primary has a breaker of its
    # own, so the process's breaker alone decides.
    with local_cluster(persistent=True) as cluster:
        async with outage_path(cluster, pg_store, clock, node_connections=False) as path:
            resilient, tracker, outbox = path.resilient, path.tracker, path.outbox
            expected: Counter[str] = Counter()
            ids = [str(n) for n in range(40)]
            dead, on_dead, on_live = await _counted_once_each(path, cluster, ids, expected)
            assert on_dead and on_live
            cluster.kill(dead)

            # Views of the dead node's shards fail until the breaker opens (a call lost with the
            # node's connection is unknown; one that could not open a connection was never
            # sent, and is kept); from then on every view is kept in the outbox.
            unknown = 0
            for content_id in on_dead + on_live:
                result = await resilient.track_view("story", content_id, "user:2")
                if result.counted or result.queued:
                    expected[content_id] += 1
                else:
                    unknown += 1
                    assert content_id in on_dead
            # At most the view that met the dead node's connection: the others could not open
            # one, so they were never sent, and were kept.
            assert unknown <= 1
            assert not resilient.breaker.is_closed

            cluster.restart(dead)
            report = await replay_when_back(Replayer(tracker, outbox))
            assert report.counted == len(ids) - unknown
            assert await outbox.oldest(10) == []
            await tracker.drain()
            await _synced_exactly(path, pg_store, clock, ids, expected)
            assert await tracker.get_view_counts("story", ids) == {i: expected[i] for i in ids}


async def _synced_exactly(
    path: OutagePath, store: Store, clock: FakeClock, ids: list[str], expected: Counter[str]
) -> None:
    """A sync moves every view counted or kept, and the database then holds ``expected``."""
    sync = await ViewSync(cast(Redis, path.redis), store, path.settings, clock=clock).run()
    assert sync.views == sum(expected.values())
    for content_id in ids:
        assert await store.read_count("story", content_id) == expected[content_id]


async def replay_when_back(replayer: Replayer, node_clock: FakeClock | None = None) -> ReplayReport:
    """Replay once the restarted primary answers (a pooled connection's first command to it
    may fail, and the client never resends; each retry is idempotent through the markers),
    each try after its breaker's longest back-off when it has one (``node_clock``)."""
    for _attempt in range(50):
        if node_clock is not None:
            node_clock.advance(60.0)
        try:
            return await replayer.replay()
        except RedisError:
            await asyncio.sleep(0.1)  # the restarted process, not a clock: real time
    pytest.fail("the restarted primary did not take the replay")


async def test_a_dead_primary_sends_only_its_own_views_to_the_outbox(
    pg_store: Store, clock: FakeClock
) -> None:
    with local_cluster(persistent=True) as cluster:
        async with outage_path(cluster, pg_store, clock, node_connections=True) as path:
            resilient, nodes, outbox = path.resilient, path.nodes, path.outbox
            assert nodes is not None and path.node_clock is not None
            expected: Counter[str] = Counter()
            ids = [str(n) for n in range(40)]
            dead, on_dead, on_live = await _counted_once_each(path, cluster, ids, expected)
            assert len(on_dead) > 3 and on_live
            cluster.kill(dead)

            # Its first views find no connection: never sent, kept. Three of them open the
            # node's breaker (and, in a row, the whole-Redis breaker for its back-off).
            for content_id in on_dead[:3]:
                assert (await resilient.track_view("story", content_id, "user:2")).queued
                expected[content_id] += 1
            assert nodes.breakers[dead.address].state is BreakerState.OPEN
            path.breaker_clock.advance(60.0)

            # From then on the live nodes' views are counted and the dead node's are kept at
            # once, and the whole-Redis breaker stays closed.
            for content_id in on_live + on_dead[3:]:
                result = await resilient.track_view("story", content_id, "user:3")
                assert result.queued if content_id in on_dead else result.counted
                expected[content_id] += 1
            assert resilient.breaker.is_closed
            assert await outbox.counts("story", on_live) == dict.fromkeys(on_live, 0)

            cluster.restart(dead)
            report = await replay_when_back(Replayer(path.tracker, outbox), path.node_clock)
            # Every kept view of the dead node (an attempt cut short may have replayed some).
            assert report.events == report.counted + report.already_replayed == len(on_dead)
            await _synced_exactly(path, pg_store, clock, ids, expected)
