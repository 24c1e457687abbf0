"""A ``redis+cluster://`` URL: the cluster client it builds (start-up on it is in
test_cluster_startup.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import LocalCluster
from viewmw import ConfigurationError, Settings
from viewmw.assembly import connect_redis, connect_redis_cluster


def _settings(url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3",
        secret="test-secret-0123456789",
    )


async def test_the_cluster_client_reaches_every_primary_and_never_resends(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, tmp_path: Path
) -> None:
    # One node in the URL is enough: the client learns the others from it.
    first = redis_cluster.nodes[0]
    client = connect_redis_cluster(_settings(f"redis+cluster://127.0.0.1:{first.port}", tmp_path))
    try:
        await client.initialize()
        assert sorted(node.port for node in client.get_primaries()) == sorted(
            node.port for node in redis_cluster.nodes
        )
        assert client.retry.get_retries() == 0
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        assert await script(keys=["{c:07}story:views:7"]) == 1
        assert await cluster_redis.get("{c:07}story:views:7") == b"1"
    finally:
        await client.aclose()


def test_a_cluster_client_needs_a_cluster_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="redis\\+cluster://"):
        connect_redis_cluster(_settings("redis://127.0.0.1:6379/0", tmp_path))


async def test_connect_redis_on_a_cluster_url_gives_the_cluster_client(tmp_path: Path) -> None:
    client = connect_redis(_settings("redis+cluster://127.0.0.1:7000", tmp_path))
    try:
        assert isinstance(client, RedisCluster)  # seen as a Redis by the type checker (as_redis)
        assert client.retry.get_retries() == 0
    finally:
        await client.aclose()
