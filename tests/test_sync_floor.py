"""The sync's batch scripts on a Redis Cluster, where the lock is in another slot: each content
shard's fence floor refuses a sync older than the newest that has acted on the shard
(``lua/shared/holds_sync.lua``, docs/keys.md *The sync on a cluster*). On a real local cluster."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

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
