"""The sync's batch scripts on a Redis Cluster, where the lock is in another slot: each content
shard's fence floor refuses a sync older than the newest that has acted on the shard
(``lua/shared/holds_sync.lua``, docs/keys.md *The sync on a cluster*). A run claims every shard
before it reads or moves anything (``lua/claim_shard.lua``), so an older sync that wakes up
acts on none of them, and a fence that collides with a shard's floor is moved past it. On a real
local cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import LocalCluster
from tests.support import FakeClock
from tests.test_sync import Hook, World
from viewmw import Settings, Store
from viewmw.errors import LockLostError
from viewmw.keys import KeySchema
from viewmw.scripts import Scripts

KEYS = KeySchema("", 5, 128)
NO_TOKEN = ""  # a cluster's syncs pass no lock token: the floor decides


async def _open(scripts: Scripts, batch_id: str, fence: int) -> int:
    return int(
        await scripts.open_batch(
            keys=[KEYS.sync_fence_floor, KEYS.sync_batch],
            args=[NO_TOKEN, batch_id, "2026-11-30T00:00:00+00:00", fence],
        )
    )


async def _seal(scripts: Scripts, batch_id: str, fence: int) -> int:
    items = KEYS.sync_batch_items(batch_id)
    return int(
        await scripts.seal(
            keys=[KEYS.sync_fence_floor, KEYS.sync_batch, items, KEYS.sync_batch_items("legacy")],
            args=[NO_TOKEN, batch_id, fence],
        )
    )


async def _drop(scripts: Scripts, batch_id: str, fence: int) -> int:
    return int(
        await scripts.drop_batch(
            keys=[KEYS.sync_fence_floor, KEYS.sync_batch, KEYS.sync_batch_items(batch_id)],
            args=[NO_TOKEN, batch_id, fence],
        )
    )


async def test_a_newer_sync_that_acted_on_a_shard_shuts_every_older_one_out(
    cluster_redis: RedisCluster,
) -> None:
    scripts = Scripts.register(cluster_redis)
    assert await _open(scripts, "b3", 3) == 1
    assert int(await cluster_redis.get(KEYS.sync_fence_floor)) == 3

    # A sync with fence 4 takes the batch over (a recovery seals it under its own fence).
    assert await _seal(scripts, "b3", 4) == 1
    assert int(await cluster_redis.get(KEYS.sync_fence_floor)) == 4
    # The sync with fence 3 can no longer seal, read or drop anything in the shard.
    assert await _seal(scripts, "b3", 3) == -1
    assert await _drop(scripts, "b3", 3) == -1
    read = await scripts.read_batch(
        keys=[
            KEYS.sync_fence_floor,
            KEYS.sync_batch,
            KEYS.sync_batch_items("b3"),
            KEYS.sync_batch_days("b3"),
        ],
        args=[NO_TOKEN, "b3", 3, "0", 100],
    )
    assert read == [-1]
    assert await cluster_redis.hget(KEYS.sync_batch, "fence") == b"4"

    # The newer sync goes on: the empty batch is dropped, and the floor never moves back.
    assert await _drop(scripts, "b3", 4) == 1
    assert await _open(scripts, "b-old", 2) == -1
    assert await cluster_redis.exists(KEYS.sync_batch) == 0
    assert int(await cluster_redis.get(KEYS.sync_fence_floor)) == 4


async def test_every_batch_key_of_a_shard_is_one_call_on_a_real_cluster(
    cluster_redis: RedisCluster,
) -> None:
    # The floor, the batch and its items share the shard's slot: the cluster runs the call.
    scripts = Scripts.register(cluster_redis)
    for shard in (0, 63, 127):
        keys = KeySchema("app:", shard, 128)
        opened = await scripts.open_batch(
            keys=[keys.sync_fence_floor, keys.sync_batch],
            args=[NO_TOKEN, f"b{shard}", "2026-11-30T00:00:00+00:00", 1],
        )
        assert int(opened) == 1


async def test_a_claim_is_strict_and_takes_the_shards_batch_and_dirty_set(
    cluster_redis: RedisCluster,
) -> None:
    scripts = Scripts.register(cluster_redis)

    async def claim(fence: int) -> list[object]:
        reply = await scripts.claim_shard(
            keys=[KEYS.sync_fence_floor, KEYS.sync_batch, KEYS.draining, KEYS.dirty],
            args=[fence],
        )
        return [int(v) if isinstance(v, int) else v.decode() for v in reply]

    await cluster_redis.sadd(KEYS.dirty, "story:1", "story:2")
    await cluster_redis.sadd(KEYS.draining, "story:3")  # left by a run that died
    assert await claim(7) == [1, "", "", 3]
    assert await cluster_redis.exists(KEYS.dirty) == 0
    assert await _open(scripts, "b7", 7) == 1
    # The same fence again is another sync's (the counter was lost): refused, with the floor.
    assert await claim(7) == [0, 7]
    assert await claim(6) == [0, 7]
    reply = await claim(8)
    assert reply[:2] == [1, "b7"] and reply[3] == 3
    assert int(await cluster_redis.get(KEYS.sync_fence_floor)) == 8


@pytest.fixture
async def cluster_world(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    pg_store: Store,
    settings: Settings,
    clock: FakeClock,
) -> AsyncIterator[World]:
    settings = settings.replace(redis_url=redis_cluster.url)
    world = World(cast(aioredis.Redis, cluster_redis), pg_store, clock, settings)
    yield world
    await world.bury()


async def test_a_run_whose_fence_a_shard_has_seen_moves_it_past_every_floor(
    cluster_world: World,
) -> None:
    world = cluster_world
    await world.seed()
    await world.traffic(range(2))
    # Redis lost the fence counter while the shards kept the floors of the syncs before.
    floors = [keys.sync_fence_floor for keys in world.shards.schemas]
    for n, floor in enumerate(floors[::7]):
        await world.redis.set(floor, 40 + n)
    highest = 40 + len(floors[::7]) - 1
    await world.redis.delete(world.keys.sync_fence)

    report = await world.sync().run()
    assert report.views == sum(world.accepted.values())
    await world.check_settled()
    assert min([int(await world.redis.get(floor)) for floor in floors]) > highest


async def test_once_a_newer_sync_has_claimed_the_shards_an_older_one_acts_on_none(
    cluster_world: World,
) -> None:
    world = cluster_world
    await world.seed()
    await world.traffic(range(2))

    older_hook = Hook()
    older_mid_batch = older_hook.park_at("snapshot")
    older = world.start(world.sync(on_step=older_hook).run())
    await older_mid_batch.must_be_reached_by(older)
    older_fence = int(await world.redis.get(world.keys.sync_fence))
    await world.redis.delete(world.keys.sync_lock)  # its lock expires

    newer_hook = Hook()
    newer_recovering = newer_hook.park_at("sealed")  # the older sync's batch, taken over
    newer = world.start(world.sync(on_step=newer_hook).run())
    await newer_recovering.must_be_reached_by(newer)
    # Every shard is the newer sync's, those it has not come to yet included.
    floors = [int(await world.redis.get(keys.sync_fence_floor)) for keys in world.shards.schemas]
    assert min(floors) > older_fence
    untouched = world.shards.schemas[-1]
    opened = await Scripts.register(world.redis).open_batch(
        keys=[untouched.sync_fence_floor, untouched.sync_batch],
        args=[NO_TOKEN, "late", "2026-11-30T00:00:00+00:00", older_fence],
    )
    assert int(opened) == -1

    older_mid_batch.open()
    with pytest.raises(LockLostError):
        await older
    newer_recovering.open()
    await newer
    await world.check_settled()
