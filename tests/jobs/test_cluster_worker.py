"""The worker on a Redis Cluster: its actors sync a cluster's views, its broker is never the
cluster, and a cluster that does not answer stops ``dramatiq viewmw.jobs`` and
``periodiq viewmw.jobs`` at start-up with one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

import viewmw.jobs.actors
from tests.asgi_support import free_port
from tests.cluster_support import LocalCluster
from tests.jobs.conftest import ActorSync, StubWorker
from tests.jobs.test_startup import COMMANDS, ROOT, start
from viewmw import BuiltTracker, ConfigurationError, Settings, Store
from viewmw.jobs import sync_view_counts
from viewmw.jobs.settings import WorkerSettings

SINGLE_BROKER = (
    "Dramatiq's Redis broker does not run on a Redis Cluster: set VIEWMW_BROKER_URL to a single "
    "Redis (redis://host:6379/0) or RabbitMQ (amqp://user:password@host:5672)"
)


async def test_the_sync_actor_syncs_a_cluster(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    tmp_path: Path,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        redis_url=redis_cluster.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3",
        secret="cluster-secret-0123456789",
        redis_timeout=10.0,
    )
    built = BuiltTracker(settings)
    await built.startup()
    ids = [str(n) for n in range(20)]
    try:
        for content_id in ids:
            assert (await built.tracker.track_view("task", content_id, "user:1")).counted
    finally:
        await built.aclose()
    monkeypatch.setattr(viewmw.jobs.actors, "settings", settings)

    sync_view_counts.send()
    await stub_worker.drain()

    assert sum(report.views for report in actor_sync.reports) == len(ids)
    store = Store.from_settings(settings)
    try:
        counts = [await store.read_count("task", content_id) for content_id in ids]
    finally:
        await store.close()
    assert counts == [1] * len(ids)
    shards = settings.content_shards()
    for content_id in ids:
        assert (
            await cluster_redis.get(shards.of("task", content_id).pending("task", content_id))
            is None
        )


@pytest.mark.parametrize("broker_set", [False, True])
def test_the_broker_is_never_the_cluster(broker_set: bool) -> None:
    cluster = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    settings = Settings(redis_url=cluster, database_url="sqlite+aiosqlite://")
    environ = {"VIEWMW_BROKER_URL": cluster} if broker_set else {}
    with pytest.raises(ConfigurationError) as error:
        WorkerSettings.from_env(settings, environ)
    assert error.value.setting == "VIEWMW_BROKER_URL"
    assert str(error.value).endswith(SINGLE_BROKER)
    if not broker_set:
        assert "is not set and VIEWMW_REDIS_URL names a Redis Cluster" in str(error.value)
    amqp = WorkerSettings.from_env(settings, {"VIEWMW_BROKER_URL": "amqp://127.0.0.1:1"})
    assert amqp.broker_url == "amqp://127.0.0.1:1"


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_dead_cluster_stops_the_worker_at_start_up_with_one_line(command: str) -> None:
    dead = f"redis+cluster://127.0.0.1:{free_port()}"
    result = start(
        command, VIEWMW_REDIS_URL=dead, VIEWMW_DATABASE_URL="sqlite+aiosqlite:///unused.sqlite3"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if dead in line]
    assert line.startswith(f"viewmw: the Redis Cluster at {dead} is not reachable (")
    assert line.endswith("or set VIEWMW_REDIS_URL.")


@pytest.mark.slow
def test_a_cluster_as_the_default_broker_stops_the_worker_with_one_line(
    redis_cluster: LocalCluster,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env.update(
        VIEWMW_REDIS_URL=redis_cluster.url, VIEWMW_DATABASE_URL="sqlite+aiosqlite:///unused.db"
    )
    result = subprocess.run(
        COMMANDS["dramatiq"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "VIEWMW_BROKER_URL" in line]
    assert lines == [
        "viewmw: VIEWMW_BROKER_URL is not set and VIEWMW_REDIS_URL names a Redis Cluster; "
        + SINGLE_BROKER
    ]
