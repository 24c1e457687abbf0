"""A ``redis+cluster://`` URL: the cluster client it builds, and the clear start-up error that
stands until viewmw's scripts run on a cluster (see docs/keys.md, "Redis Cluster")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette

from tests.cluster_support import LocalCluster
from viewmw import BuiltTracker, ConfigurationError, Settings, ViewTrackingMiddleware, build_tracker
from viewmw.assembly import connect_redis, connect_redis_cluster
from viewmw.cli import EXIT_UNAVAILABLE, main

NOT_COMPLETE = "Redis Cluster support is not complete"


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


def test_a_tracker_on_a_cluster_fails_at_start_up_saying_why(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = _settings(redis_cluster.url, tmp_path)

    for start in (
        lambda: connect_redis(settings),
        lambda: build_tracker(settings),
        lambda: BuiltTracker(settings),
        lambda: ViewTrackingMiddleware(Starlette(), routes={}, settings=settings),
    ):
        with pytest.raises(ConfigurationError) as error:
            start()
        assert error.value.setting == "redis_url"
        assert NOT_COMPLETE in str(error.value)
        assert "redis://host:port/db" in str(error.value)


def test_the_command_on_a_cluster_exits_2_saying_why(
    redis_cluster: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [name for name in os.environ if name.startswith("VIEWMW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VIEWMW_REDIS_URL", redis_cluster.url)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3")

    assert main(["sync"]) == EXIT_UNAVAILABLE
    error = capsys.readouterr().err
    assert error.startswith("viewmw: VIEWMW_REDIS_URL names a Redis Cluster")
    assert NOT_COMPLETE in error
