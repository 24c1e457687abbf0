"""The local Redis Cluster the cluster tests stand on (tests/cluster_support.py) is a real one:
keys spread over its three primaries, a script runs only on keys of one slot, and a primary
killed with SIGKILL comes back on its port with its slots (and, when persistent, its data)."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from tests import cluster_support
from tests.cluster_support import ClusterError, LocalCluster, local_cluster

# Two keys of one content shard: the hash tag `{c:07}` puts both in one slot.
_ADD_TO_BOTH = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[1])
return {tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('HGET', KEYS[2], ARGV[2]))}
"""


def _client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes]
    )


async def test_keys_land_on_every_primary(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster
) -> None:
    assert len(redis_cluster.nodes) == 3
    for n in range(300):
        await cluster_redis.set(f"story:views:{n}", n)

    sizes = []
    for node in redis_cluster.nodes:
        with redis_cluster.client(node) as client:
            sizes.append(client.dbsize())
    assert sum(sizes) == 300
    assert all(size > 0 for size in sizes), sizes


async def test_a_script_runs_on_hash_tagged_keys_and_is_refused_across_slots(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster
) -> None:
    script = cluster_redis.register_script(_ADD_TO_BOTH)
    keys = ["{c:07}story:views:7", "{c:07}story:days:7"]

    assert await script(keys=keys, args=[2, "2026-11-30"]) == [2, 2]
    assert await script(keys=keys, args=[3, "2026-11-30"]) == [5, 5]

    # Without a shared tag the keys hash to different slots: redis-py refuses the call before
    # sending it, and the server itself refuses it too.
    untagged = ["story:views:7", "story:days:7"]
    assert cluster_redis.keyslot(untagged[0]) != cluster_redis.keyslot(untagged[1])
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=untagged, args=[1, "2026-11-30"])
    node = redis_cluster.node_for_slot(cluster_redis.keyslot(untagged[0]))
    with redis_cluster.client(node) as client, pytest.raises(ResponseError, match="same slot"):
        client.eval(_ADD_TO_BOTH, 2, *untagged, 1, "2026-11-30")


async def test_a_killed_primary_restarts_with_its_slots_and_its_data() -> None:
    with local_cluster(persistent=True) as cluster:
        client = _client(cluster)
        try:
            key = "{c:07}story:views:7"
            await client.set(key, 41)
            node = cluster.node_for_slot(client.keyslot(key))

            cluster.kill(node)
            assert node.process is None
            cluster.restart(node)

            # Same port, same slots (its node configuration), same data (its append-only file).
            assert cluster.node_for_slot(client.keyslot(key)) is node
            assert await client.incr(key) == 42
        finally:
            await client.aclose()


def test_missing_binaries_fail_with_how_to_install_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster_support.shutil, "which", lambda name: None)

    with pytest.raises(ClusterError) as failed, local_cluster():
        pass

    message = str(failed.value)
    assert "redis-server, redis-cli" in message
    assert "apt-get install redis-server" in message
    assert "brew install redis" in message
