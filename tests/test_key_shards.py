"""Content shards (Redis Cluster, docs/keys.md): on a single Redis every key keeps its name; on a
cluster every key one script call touches is in one slot, and the shards spread over the nodes.

Slots are computed with redis-py's own CRC16 (the function its cluster client routes with), and
checked against a real local cluster (tests/cluster_support.py).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from tests.cluster_support import LocalCluster
from viewmw.keys import KeySchema, content_shard, viewer_shard
from viewmw.shards import DEFAULT_CLUSTER_SHARDS, ContentShards

content_types = st.text(string.ascii_lowercase, min_size=1, max_size=12)
content_ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=64)
viewers = st.builds(
    lambda kind, token: f"{kind}:{token}",
    st.sampled_from(["user", "anon"]),
    st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=64),
)
DAY, EVENT, BATCH = "2026-11-30", "0f" * 16, "ab" * 16


def _content_keys(keys: KeySchema, content_type: str, content_id: str, viewer: str) -> list[str]:
    """Every key that one recording, read or sync call may touch for one content, with the
    shard's own keys: they must all share a slot."""
    return [
        keys.pending(content_type, content_id),
        keys.syncing(content_type, content_id),
        keys.database_count(content_type, content_id),
        keys.days(content_type, content_id),
        keys.uniques(content_type, content_id, DAY),
        keys.sessions(viewer),
        keys.pair_session(viewer, content_type, content_id),
        keys.ranking(content_type, DAY),
        keys.blocked(DAY),
        keys.dirty,
        keys.draining,
        keys.epoch,
        keys.sync_batch,
        keys.sync_batch_items(BATCH),
        keys.sync_batch_days(BATCH),
        keys.replay_marker(EVENT),
        keys.scratch("t1"),
        keys.merged_sketch(content_type, content_id, "start", DAY, 7),
    ]


def test_a_single_redis_keeps_every_name() -> None:
    keys = ContentShards("app:").of("story", "42")
    assert keys == KeySchema("app:")
    assert _content_keys(keys, "story", "42", "user:7") == [
        "app:story:views:42",
        "app:story:syncing:42",
        "app:story:dbviews:42",
        "app:story:days:42",
        f"app:story:uniq:{DAY}:42",
        "app:viewed:user:7",
        "app:viewed:user:7:story:42",
        f"app:viewmw:top:story:{DAY}",
        f"app:viewmw:blocked:{DAY}",
        "app:viewmw:dirty",
        "app:viewmw:dirty:sync",
        "app:viewmw:epoch",
        "app:viewmw:sync:batch",
        f"app:viewmw:sync:batch:{BATCH}:items",
        f"app:viewmw:sync:batch:{BATCH}:days",
        f"app:viewmw:replayed:{EVENT}",
        "app:viewmw:scratch:t1",
        f"app:viewmw:kept:story:start:{DAY}:7:42",
    ]
    assert keys.daily_views("user:7", DAY) == f"app:daily_views:user:7:{DAY}"
    assert (keys.sync_lock, keys.sync_fence) == ("app:viewmw:sync:lock", "app:viewmw:sync:fence")


def test_a_shard_tags_its_keys_where_docs_keys_md_says() -> None:
    keys = KeySchema("", 5, 128)
    assert keys.pending("story", "42") == "story:views:{c:5}:42"
    assert keys.sessions("user:7") == "viewed:user:7:{c:5}"
    assert keys.pair_session("user:7", "story", "42") == "viewed:user:7:story:{c:5}:42"
    assert keys.dirty == "viewmw:dirty:{c:5}"
    assert keys.ranking("story", DAY) == f"viewmw:top:story:{DAY}:{{c:5}}"
    assert keys.sync_batch_items(BATCH) == f"viewmw:sync:batch:{{c:5}}:{BATCH}:items"
    shard = viewer_shard("user:7", 128)
    assert keys.daily_views("user:7", DAY) == f"daily_views:{{v:{shard}}}:user:7:{DAY}"
    assert (keys.sync_lock, keys.sync_fence) == ("viewmw:{sync}:lock", "viewmw:{sync}:fence")
    # The pending counters are still found by the pattern the statistics scan with.
    assert keys.pending_pattern == "*:views:*"


@given(content_types, content_ids, viewers, st.integers(1, 1024), st.sampled_from(["", "app:"]))
def test_every_key_of_a_content_is_in_its_shards_slot(
    content_type: str, content_id: str, viewer: str, count: int, prefix: str
) -> None:
    shards = ContentShards(prefix, count)
    keys = shards.of(content_type, content_id)
    assert keys.shard == content_shard(content_type, content_id, count)
    slots = {
        key_slot(key.encode()) for key in _content_keys(keys, content_type, content_id, viewer)
    }
    assert slots == {key_slot(f"{{c:{keys.shard}}}".encode())}


@given(viewers, st.integers(1, 1024), st.integers(0, 1023))
def test_a_viewers_daily_counters_are_in_its_viewer_shard_from_any_content_shard(
    viewer: str, count: int, shard: int
) -> None:
    keys = KeySchema("", shard % count, count)
    days = [keys.daily_views(viewer, day) for day in (DAY, "2026-12-01")]
    expected = key_slot(f"{{v:{viewer_shard(viewer, count)}}}".encode())
    assert {key_slot(key.encode()) for key in days} == {expected}


def test_the_sync_lock_and_fence_share_a_slot() -> None:
    keys = KeySchema("app:", 0, 128)
    assert key_slot(keys.sync_lock.encode()) == key_slot(keys.sync_fence.encode())


def test_shards_are_stable_across_processes_and_versions() -> None:
    # CRC-32, never Python's salted hash(): these numbers must never change, or an upgrade would
    # move every content to another shard and strand its pending views.
    # (CRC-32 of "story:42" is 0x695c9e25.)
    assert content_shard("story", "42", 128) == 0x695C9E25 % 128 == 37
    assert content_shard("story", "43", 128) == 51
    assert viewer_shard("user:7", 128) == 55


def test_a_shard_count_out_of_range_is_refused() -> None:
    for count in (0, -1, 16385):
        with pytest.raises(ValueError, match="1 to 16384 content shards"):
            ContentShards("", count)


async def test_the_default_shards_spread_over_every_primary_of_a_real_cluster(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster
) -> None:
    shards = ContentShards("", DEFAULT_CLUSTER_SHARDS)
    per_node: dict[int, int] = {}
    for keys in shards.schemas:
        node = redis_cluster.node_for_slot(key_slot(keys.epoch.encode()))
        per_node[node.port] = per_node.get(node.port, 0) + 1
    assert len(per_node) == 3
    # docs/keys.md: 41/42/45 of 128 on the default slot ranges of three primaries.
    assert min(per_node.values()) >= 128 // 3 - 6, per_node


async def test_one_script_call_touches_every_key_of_a_content_on_a_real_cluster(
    cluster_redis: RedisCluster,
) -> None:
    # The server refuses a script whose keys span slots: this call is accepted on every node.
    touch = cluster_redis.register_script(
        "for i = 1, #KEYS do redis.call('SET', KEYS[i], i) end return #KEYS"
    )
    shards = ContentShards("app:", DEFAULT_CLUSTER_SHARDS)
    for content_id in range(40):
        keys = shards.of("story", str(content_id))
        names = _content_keys(keys, "story", str(content_id), "anon:x")
        assert await touch(keys=names) == len(names)
