"""``viewmw migrate-keys`` from the command line: a single Redis' rules state copied into a real
local Redis Cluster (VIEWMW_REDIS_URL), and a source that does not answer said in one line."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import LocalCluster, local_server
from tests.support import GENEROUS_DEADLINES, FakeClock
from viewmw import Limits, Settings, Store, ViewTracker
from viewmw.cli import main


@pytest.fixture
def cluster_env(
    redis_cluster: LocalCluster, pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> LocalCluster:
    monkeypatch.setenv("VIEWMW_REDIS_URL", redis_cluster.url)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", pg_store.engine.url.render_as_string(False))
    return redis_cluster


async def test_the_command_copies_the_old_redis_into_the_cluster(
    cluster_env: LocalCluster,
    cluster_redis: RedisCluster,
    clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_server() as url:  # the cluster's build: DUMP payloads must be readable there
        client = aioredis.Redis.from_url(url)
        old = ViewTracker(
            client, None, Settings(limits=Limits(), **GENEROUS_DEADLINES), clock=clock
        )
        for content_id in ("1", "2"):
            assert (await old.track_view("story", content_id, "user:1")).counted
        await old.drain()
        await client.aclose()
        await _copy_twice(url, capsys)


async def _copy_twice(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _run(["migrate-keys", "--from", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"] == 2 and report["daily_counters"] == 1
    assert report["sketches"] == 2 and report["already_there"] == 0

    assert await _run(["migrate-keys", "--from", url]) == 0
    assert "copied 0 sessions" in capsys.readouterr().out


async def test_a_source_that_does_not_answer_is_one_line(
    cluster_env: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run(["migrate-keys", "--from", "redis://127.0.0.1:1/0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("viewmw: ") and "127.0.0.1:1" in error and "Traceback" not in error


async def _run(argv: list[str]) -> int:
    """``main`` runs its own event loop: run it off this test's loop."""
    return await asyncio.to_thread(main, argv)
