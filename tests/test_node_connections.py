"""A tracker on a real local Redis Cluster whose script calls go through one lean connection per
primary (viewmw.node_connections): views conserved over many shards, a slot that moved to
another node followed (its ``MOVED`` reply means the call never ran, so it is sent once more), and
a killed primary failing only its own shards' views until it is back, and a slot whose keys are
being moved (``ASK``: sent to the node named after ``ASKING``; ``TRYAGAIN``: tried again after a
pause, then given up): a refused call never ran, so none runs twice. The rules suite runs on this
path too (tests/test_rules.py, its cluster backend)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.cluster_support import LocalCluster, LocalNode, local_cluster
from tests.support import FakeClock
from viewmw import (
    Limits,
    Outbox,
    RedisProbe,
    Replayer,
    ResilientTracker,
    Settings,
    Store,
    TrackResult,
    ViewTracker,
)
from viewmw.assembly import connect_redis_cluster
from viewmw.calendar_day import local_date
from viewmw.failures import NodeDownError
from viewmw.node_connections import _TRYAGAIN_PAUSES, NodeConnections
from viewmw.outage.breaker import BreakerState


def _tracker(
    redis: RedisCluster, url: str, clock: FakeClock, nodes: NodeConnections, **limits: Any
) -> ViewTracker:
    settings = Settings(redis_url=url, limits=Limits(**limits), redis_timeout=10.0)
    return ViewTracker(cast(Redis, redis), None, settings, clock=clock, script_connection=nodes)


@pytest.fixture
async def nodes(cluster_redis: RedisCluster) -> AsyncIterator[NodeConnections]:
    connections = NodeConnections(cluster_redis)
    yield connections
    await connections.aclose()


async def _pending(redis: RedisCluster, tracker: ViewTracker, content_id: str) -> int:
    return int(
        await redis.get(tracker.shards.of("story", content_id).pending("story", content_id)) or 0
    )


async def test_views_over_every_node_are_conserved_on_the_node_connections(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    nodes: NodeConnections,
    clock: FakeClock,
) -> None:
    tracker = _tracker(
        cluster_redis,
        redis_cluster.url,
        clock,
        nodes,
        max_daily_views_per_user=5,
        view_cooldown_seconds=None,
        max_views_per_session=2,
        one_view_per_day=False,
    )
    random.seed(11)
    offers = [(f"user:{random.randrange(12)}", str(random.randrange(60))) for _ in range(600)]
    try:
        results = await asyncio.gather(
            *(tracker.track_view("story", content, viewer) for viewer, content in offers)
        )
    finally:
        await tracker.drain()
    counted = Counter(content for (_, content), r in zip(offers, results, strict=True) if r.counted)
    by_viewer = Counter(viewer for (viewer, _), r in zip(offers, results, strict=True) if r.counted)
    assert max(by_viewer.values()) <= 5 and sum(counted.values()) > 0
    for content in {content for _, content in offers}:
        assert await _pending(cluster_redis, tracker, content) == counted[content]
    # Three primaries, one connection each, whatever the number of shards the views touched.
    assert len(nodes._connections) == 3


async def test_a_slot_moved_to_another_node_is_followed_and_counted_once(clock: FakeClock) -> None:
    with local_cluster() as cluster:
        redis = connect_redis_cluster(Settings(redis_url=cluster.url))
        nodes = NodeConnections(redis)
        tracker = _tracker(redis, cluster.url, clock, nodes, view_cooldown_seconds=None)
        try:
            assert (await tracker.track_view("story", "1", "user:1")).counted  # maps the slots
            moved = next(
                content_id
                for content_id in (str(n) for n in range(2, 500))
                if tracker.shards.index("story", content_id) != tracker.shards.index("story", "1")
            )
            slot = redis.keyslot(tracker.shards.of("story", moved).epoch)
            source = cluster.node_for_slot(slot)
            target = next(node for node in cluster.nodes if node is not source)
            _move_empty_slot(cluster, slot, source, target)

            result = await tracker.track_view("story", moved, "user:1")
            assert isinstance(result, TrackResult) and result.counted
            assert cluster.node_for_slot(slot) is target
            assert nodes._refresh is not None  # it was refused with MOVED, and learned the move
            assert await _pending(redis, tracker, moved) == 1
        finally:
            await tracker.drain()
            await nodes.aclose()
            await redis.aclose()


def _move_empty_slot(cluster: LocalCluster, slot: int, source: Any, target: Any) -> None:
    """Give ``slot`` (no keys in it yet) from ``source`` to ``target``, as a resharding does."""
    with cluster.client(source) as from_node, cluster.client(target) as to_node:
        source_id = from_node.execute_command("CLUSTER MYID").decode()
        target_id = to_node.execute_command("CLUSTER MYID").decode()
        to_node.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        from_node.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        assert from_node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        for node in cluster.nodes:
            with cluster.client(node) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


async def test_a_killed_primary_fails_only_its_shards_views_until_it_is_back(
    clock: FakeClock,
) -> None:
    with local_cluster(persistent=True) as cluster:
        redis = connect_redis_cluster(Settings(redis_url=cluster.url))
        node_clock = FakeClock(now=0.0)  # the primaries' breakers' back-off
        nodes = NodeConnections(redis, connect_timeout=2.0, reply_timeout=5.0, clock=node_clock)
        # The daily limit off: each view is one call, in its content's shard only.
        tracker = _tracker(
            redis,
            cluster.url,
            clock,
            nodes,
            view_cooldown_seconds=None,
            max_daily_views_per_user=None,
        )
        ids = [str(n) for n in range(40)]
        try:
            assert all(r.counted for r in await _offer(tracker, ids, "user:1"))
            dead = cluster.nodes[0]
            on_dead = {
                i
                for i in ids
                if cluster.node_for_slot(redis.keyslot(tracker.shards.of("story", i).epoch)) is dead
            }
            assert 0 < len(on_dead) < len(ids)
            cluster.kill(dead)
            outcomes = await _offer(tracker, ids, "user:2")
            for content_id, outcome in zip(ids, outcomes, strict=True):
                if content_id in on_dead:
                    assert isinstance(outcome, RedisConnectionError), (content_id, outcome)
                else:
                    assert isinstance(outcome, TrackResult) and outcome.counted, (
                        content_id,
                        outcome,
                    )

            # The dead node's breaker is open: its views now fail at once, never sent, while
            # the other nodes' views are decided as ever.
            assert nodes.breakers[dead.address].state is BreakerState.OPEN
            again = await _offer(tracker, ids, "user:4")
            for content_id, outcome in zip(ids, again, strict=True):
                if content_id in on_dead:
                    assert isinstance(outcome, NodeDownError), (content_id, outcome)
                else:
                    assert isinstance(outcome, TrackResult) and outcome.counted

            cluster.restart(dead)
            back = await _offer_until_answered(tracker, sorted(on_dead), "user:3", node_clock)
            assert all(isinstance(r, TrackResult) and r.counted for r in back)
            assert nodes.breakers[dead.address].state is BreakerState.CLOSED
            # A live node's content has three views: user:1's, user:2's and user:4's; the dead
            # node's two: user:1's and user:3's (user:2's and user:4's were never decided).
            expected = [2 if i in on_dead else 3 for i in ids]
            assert [await _pending(redis, tracker, i) for i in ids] == expected
        finally:
            await tracker.drain()
            await nodes.aclose()
            await redis.aclose()


async def _offer(
    tracker: ViewTracker, ids: list[str], viewer: str
) -> list[TrackResult | BaseException]:
    return await asyncio.gather(
        *(tracker.track_view("story", content_id, viewer) for content_id in ids),
        return_exceptions=True,
    )


async def _offer_until_answered(
    tracker: ViewTracker, ids: list[str], viewer: str, node_clock: FakeClock
) -> list[TrackResult | BaseException]:
    """Offer the views again until the restarted node takes them: the first attempt may find
    the old connection closed (never resent: the view was not decided, and is offered again).
    Each attempt comes after the node's breaker's longest back-off."""
    for _attempt in range(20):
        node_clock.advance(60.0)
        outcomes = await _offer(tracker, ids, viewer)
        if not any(isinstance(o, RedisConnectionError) for o in outcomes):
            return outcomes
        ids = [i for i, o in zip(ids, outcomes, strict=True) if isinstance(o, RedisConnectionError)]
        await asyncio.sleep(0.1)
    pytest.fail("the restarted primary did not take views again")


# Slot moves, as `redis-cli --cluster reshard` makes them ----------------------------------------

_INCR_BOTH = "redis.call('INCR', KEYS[1]) return redis.call('INCR', KEYS[2])"


class _SlotMove:
    """One slot on its way from ``source`` to ``target``: keys move one ``MIGRATE`` at a time,
    and :meth:`finish` gives the slot to the target on every node."""

    def __init__(self, cluster: LocalCluster, slot: int) -> None:
        self.cluster, self.slot = cluster, slot
        self.source = cluster.node_for_slot(slot)
        self.target: LocalNode = next(n for n in cluster.nodes if n is not self.source)
        self.target_id = self._id(self.target)
        with cluster.client(self.target) as to_node:
            to_node.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", self._id(self.source))
        with cluster.client(self.source) as from_node:
            from_node.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", self.target_id)

    def _id(self, node: LocalNode) -> str:
        with self.cluster.client(node) as client:
            found = client.execute_command("CLUSTER MYID")
        return found if isinstance(found, str) else str(found.decode())

    def migrate(self, *keys: str) -> None:
        with self.cluster.client(self.source) as from_node:
            from_node.execute_command(
                "MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys
            )

    def keys_left(self) -> list[str]:
        with self.cluster.client(self.source) as from_node:
            found = from_node.execute_command("CLUSTER GETKEYSINSLOT", self.slot, 1000)
        return [key if isinstance(key, str) else key.decode() for key in found]

    def finish(self) -> None:
        if left := self.keys_left():
            self.migrate(*left)
        for node in self.cluster.nodes:
            with self.cluster.client(node) as client:
                client.execute_command("CLUSTER SETSLOT", self.slot, "NODE", self.target_id)

    def value(self, key: str) -> int:
        with self.cluster.client(self.target) as to_node:
            return int(to_node.get(key) or 0)


class _Resharding:
    """A local cluster's client and node connections, with one slot to move: the connections'
    pauses before a new try are recorded, and the ``finish_at``-th gives the slot to its new
    node (``None``: never)."""

    def __init__(self, cluster: LocalCluster, finish_at: int | None) -> None:
        self.cluster, self.finish_at = cluster, finish_at
        self.redis = connect_redis_cluster(Settings(redis_url=cluster.url))
        self.nodes = NodeConnections(self.redis, pause=self._pause)
        self.pauses: list[float] = []
        self.move: _SlotMove | None = None

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if len(self.pauses) == self.finish_at:
            assert self.move is not None
            self.move.finish()

    def start_move(self, key: str) -> _SlotMove:
        """Start moving ``key``'s slot to another node."""
        self.move = _SlotMove(self.cluster, self.redis.keyslot(key))
        return self.move


@asynccontextmanager
async def resharding(finish_at: int | None = None) -> AsyncIterator[_Resharding]:
    with local_cluster() as cluster:
        harness = _Resharding(cluster, finish_at)
        try:
            yield harness
        finally:
            await harness.nodes.aclose()
            await harness.redis.aclose()


async def test_a_call_whose_keys_have_left_follows_ask_to_the_new_node() -> None:
    async with resharding() as cluster:
        script = cluster.redis.register_script(_INCR_BOTH)
        keys = ["{moving}a", "{moving}b"]
        assert await cluster.nodes.run_script(script, keys, []) == 1
        move = cluster.start_move(keys[0])
        move.migrate(*keys)  # both gone from the source: it answers ASK
        assert await cluster.nodes.run_script(script, keys, []) == 2
        assert move.keys_left() == []
        move.finish()
        assert [move.value(key) for key in keys] == [2, 2]  # ran once, on the new node
        assert await cluster.nodes.run_script(script, keys, []) == 3  # MOVED, then the new node
        assert cluster.pauses == []


async def test_a_call_whose_keys_are_split_tries_again_after_a_pause_and_runs_once() -> None:
    async with resharding(finish_at=2) as cluster:  # the rest of the keys move meanwhile
        script = cluster.redis.register_script(_INCR_BOTH)
        keys = ["{split}a", "{split}b"]
        assert await cluster.nodes.run_script(script, keys, []) == 1
        move = cluster.start_move(keys[0])
        move.migrate(keys[0])  # one key on each node: TRYAGAIN until the move ends
        assert await cluster.nodes.run_script(script, keys, []) == 2
        assert cluster.pauses == list(_TRYAGAIN_PAUSES[:2])
        assert [move.value(key) for key in keys] == [2, 2]


async def test_a_call_still_refused_after_every_pause_fails_without_running() -> None:
    async with resharding() as cluster:
        script = cluster.redis.register_script(_INCR_BOTH)
        keys = ["{stuck}a", "{stuck}b"]
        assert await cluster.nodes.run_script(script, keys, []) == 1
        move = cluster.start_move(keys[0])
        move.migrate(keys[0])
        with pytest.raises(ResponseError, match=r"^TRYAGAIN"):
            await cluster.nodes.run_script(script, keys, [])
        assert cluster.pauses == list(_TRYAGAIN_PAUSES)
        move.finish()
        assert [move.value(key) for key in keys] == [1, 1]  # never ran


async def test_a_call_sent_on_by_ask_that_finds_keys_missing_waits_on_that_node() -> None:
    async with resharding(finish_at=1) as cluster:  # the slot is given to the new node
        script = cluster.redis.register_script(_INCR_BOTH)
        keys = ["{asked}a", "{asked}b"]  # b exists nowhere yet
        assert await cluster.nodes.run_script(script, keys[:1] * 2, []) == 2
        move = cluster.start_move(keys[0])
        move.migrate(keys[0])
        # The old node has none of the keys: ASK. The new one, asked, lacks b: TRYAGAIN, and
        # the same node is tried again once the slot is its own.
        assert await cluster.nodes.run_script(script, keys, []) == 1
        assert cluster.pauses == [_TRYAGAIN_PAUSES[0]]
        assert [move.value(key) for key in keys] == [3, 1]


async def test_a_view_offered_while_its_shard_moves_is_counted_once(clock: FakeClock) -> None:
    async with resharding(finish_at=1) as cluster:
        # The daily limit off: the view is one call, in its content's shard.
        tracker = _tracker(
            cluster.redis,
            cluster.cluster.url,
            clock,
            cluster.nodes,
            view_cooldown_seconds=None,
            max_daily_views_per_user=None,
        )
        try:
            assert (await tracker.track_view("story", "7", "user:1")).counted
            move = cluster.start_move(tracker.shards.of("story", "7").epoch)
            move.migrate(tracker.shards.of("story", "7").pending("story", "7"))
            assert (await tracker.track_view("story", "7", "user:2")).counted
            assert move.keys_left() == []
            assert await _pending(cluster.redis, tracker, "7") == 2
        finally:
            await tracker.drain()


async def test_a_view_refused_while_its_shard_moves_waits_in_the_outbox_and_keeps_no_place(
    pg_store: Store, clock: FakeClock
) -> None:
    """Default request deadline: the retries end in time for the view to go to the outbox; its
    viewer's daily place, reserved on another node, is given back; the replay counts it once."""
    async with resharding() as cluster:
        redis = cluster.redis
        settings = Settings(
            redis_url=cluster.cluster.url, limits=Limits(view_cooldown_seconds=None)
        )
        tracker = ViewTracker(
            cast(Redis, redis), pg_store, settings, clock=clock, script_connection=cluster.nodes
        )
        outbox = Outbox(pg_store.engine)
        resilient = ResilientTracker(tracker, outbox, probe=RedisProbe(None))
        day = local_date(clock(), settings.zone).isoformat()
        place = tracker.shards.schemas[0].daily_views("user:2", day)
        try:
            assert (await resilient.track_view("story", "7", "user:1")).counted
            keys = tracker.shards.of("story", "7")
            move = cluster.start_move(keys.epoch)
            move.migrate(keys.pending("story", "7"))  # the slot's keys now split: TRYAGAIN

            kept = await resilient.track_view("story", "7", "user:2")
            assert kept.queued and not kept.counted
            # Every pause taken, then refused. On a loaded machine the request's deadline can
            # pass during the tries: the view then goes to the outbox on the outage path, whose
            # own try meets the same refusals; either way the view waits in the outbox once.
            pauses = list(_TRYAGAIN_PAUSES)
            assert cluster.pauses in (pauses, pauses * 2), cluster.pauses
            await tracker.drain()  # the place's release
            assert int(await redis.hget(place, "n") or 0) == 0
            assert await outbox.counts("story", ["7"]) == {"7": 1}

            move.finish()
            report = await Replayer(tracker, outbox).replay()
            assert report.counted == 1
            assert await _pending(redis, tracker, "7") == 2
            assert int(await redis.hget(place, "n") or 0) == 1
        finally:
            await resilient.aclose()
            await tracker.drain()
