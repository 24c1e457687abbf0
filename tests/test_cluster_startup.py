"""Start-up on a ``redis+cluster://`` URL: the assembled tracker, the example app served by a real
process, the ``viewmw`` command's sync and statistics, and the one-line message when the cluster
does not answer. The probe and health with a primary down are in test_cluster_startup_health.py;
the worker's start-up in tests/jobs/test_cluster_worker.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.asgi_support import free_port
from tests.cluster_support import LocalCluster
from tests.support import GENEROUS_DEADLINES
from tests.test_example import BROWSER, Server, count_on_page
from viewmw import BuiltTracker, NodeConnections, Settings, build_tracker
from viewmw.assembly import close_clients
from viewmw.cli import EXIT_OK, EXIT_UNAVAILABLE, main

ROOT = Path(__file__).resolve().parents[1]
SECRET = "cluster-secret-0123456789"


def cluster_settings(cluster: LocalCluster, tmp_path: Path) -> Settings:
    # Generous request deadlines: a cluster client's first call learns the nodes, and a busy
    # machine must not turn the first requests' cold database reads into counts left out.
    return Settings(
        redis_url=cluster.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3",
        secret=SECRET,
        **GENEROUS_DEADLINES,
    )


def connected(client: RedisCluster) -> int:
    """How many of ``client``'s connections to the cluster's nodes are open."""
    return sum(
        1
        for node in client.get_nodes()
        for connection in node._connections  # no public view of a node's connections
        if connection.is_connected
    )


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, redis_cluster: LocalCluster, tmp_path: Path
) -> pytest.MonkeyPatch:
    """``VIEWMW_*`` naming the test cluster and a SQLite file, nothing else."""
    for name in [name for name in os.environ if name.startswith("VIEWMW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VIEWMW_REDIS_URL", redis_cluster.url)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3")
    monkeypatch.setenv("VIEWMW_SECRET", SECRET)
    return monkeypatch


async def test_build_tracker_on_a_cluster_url_counts_a_view_and_closes(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, tmp_path: Path
) -> None:
    settings = cluster_settings(redis_cluster, tmp_path)
    tracker = build_tracker(settings)
    try:
        assert tracker.store is not None
        await tracker.store.create_tables()
        assert isinstance(tracker.redis, RedisCluster)
        # One lean connection per primary carries the views (viewmw.node_connections).
        assert isinstance(tracker.script_connection, NodeConnections)
        first = await tracker.track_view("story", "7", "user:1")
        again = await tracker.track_view("story", "7", "user:1")
        await tracker.drain()
    finally:
        await close_clients(tracker)
    assert (first.counted, first.count.total) == (True, 1)
    assert (again.counted, again.reason, again.count.total) == (False, "cooldown", 1)
    pending = tracker.shards.of("story", "7").pending("story", "7")
    assert await cluster_redis.get(pending) == b"1"
    assert connected(tracker.redis) == 0  # type: ignore[arg-type]
    assert tracker.script_connection._connections == {}  # closed with the tracker


async def test_a_built_tracker_starts_counts_and_closes_on_a_cluster(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, tmp_path: Path
) -> None:
    built = BuiltTracker(cluster_settings(redis_cluster, tmp_path))
    # Tables, the cluster's nodes, the content mapping in Redis, the outbox replayer.
    await built.startup()
    ids = [str(n) for n in range(40)]
    try:
        # A burst of first requests, over many shards and every node, all at once.
        results = await asyncio.gather(
            *(built.tracker.track_view("fantasy", content_id, "user:2") for content_id in ids)
        )
        # Few ids: a cold read of many shards at once leaves counts out (a database read per
        # shard, and at most MAX_FILLS_IN_FLIGHT of them).
        counts = await built.tracker.get_view_counts("fantasy", ["0", "999"])
    finally:
        await built.aclose()
    assert [result.counted for result in results] == [True] * len(ids)
    # A count is left out, not wrong, when its cold database read did not fit (see above).
    assert {result.count.total for result in results if result.count is not None} == {1}
    assert counts == {"0": 1, "999": 0}
    assert connected(built.tracker.tracker.redis) == 0  # type: ignore[arg-type]


@pytest.mark.slow
async def test_the_example_app_counts_over_http_on_a_cluster(
    redis_cluster: LocalCluster, cluster_redis: RedisCluster, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env.update(
        PORT=str(port),
        PYTHONPATH=str(ROOT),
        VIEWMW_REDIS_URL=redis_cluster.url,
        VIEWMW_DATABASE_URL=f"sqlite:///{tmp_path}/e2e.sqlite3",
        VIEWMW_SECRET=SECRET,
    )
    server = Server([sys.executable, "-m", "examples.site"], env, cwd=tmp_path)
    try:
        server.wait_for("Application startup complete")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            shown = []
            for user in ("ann", "ben", "ann", "cat"):
                response = await client.get("/stories/2", headers={**BROWSER, "x-demo-user": user})
                assert response.status_code == 200
                assert count_on_page(response.text) == int(response.headers["x-view-count"])
                shown.append((response.headers["x-view-count"], response.headers["x-view-counted"]))
            task = await client.get("/tasks/ship-it", headers={**BROWSER, "x-demo-user": "ann"})
            listing = await client.get("/stories")
            health = await client.get("/viewmw/")
    finally:
        code = server.stop()
    assert shown == [("1", "1"), ("2", "1"), ("2", "0; reason=cooldown"), ("3", "1")]
    assert (task.headers["x-view-count"], task.headers["x-view-counted"]) == ("1", "1")
    assert "A Map of Small Rivers</a> — 3 views" in listing.text
    assert health.status_code == 200
    settings = cluster_settings(redis_cluster, tmp_path)
    pending = settings.content_shards().of("story", "2").pending("story", "2")
    assert await cluster_redis.get(pending) == b"3"
    assert code in (0, 143, -signal.SIGTERM), "".join(server.output)
    assert any("Application shutdown complete" in line for line in server.output)


async def test_the_command_syncs_and_shows_statistics_on_a_cluster(
    redis_cluster: LocalCluster,
    cluster_redis: RedisCluster,
    environment: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = cluster_settings(redis_cluster, tmp_path)
    built = BuiltTracker(settings)
    await built.startup()
    ids = [str(n) for n in range(12)]  # over several content shards
    try:
        for n, content_id in enumerate(ids):
            for viewer in range(n % 3 + 1):
                assert (
                    await built.tracker.track_view("story", content_id, f"user:{viewer}")
                ).counted
    finally:
        await built.aclose()
    expected = {content_id: n % 3 + 1 for n, content_id in enumerate(ids)}

    outputs = []
    for argv in (["sync", "--stats", "--json"], ["sync"], ["sync", "--force"], ["stats", "--json"]):
        code = await _run_main(argv)
        out = capsys.readouterr()
        assert (code, out.err) == (EXIT_OK, ""), argv
        outputs.append(out.out)
    before, after = json.loads(outputs[0]), json.loads(outputs[3])
    assert (before["dirty_contents"], before["pending_view_keys"]) == (len(ids), len(ids))
    assert before["last_syncs"] == []
    assert outputs[1].startswith(f"synced {sum(expected.values())} views of {len(ids)} contents")
    assert outputs[2].startswith("synced 0 views of 0 contents")
    assert (after["dirty_contents"], after["pending_view_keys"]) == (0, 0)
    # Each content shard's batch is its own ledger row: the newest five are shown.
    assert len(after["last_syncs"]) == 5
    assert all(batch["views"] > 0 for batch in after["last_syncs"])

    reader = BuiltTracker(settings)
    await reader.startup()
    try:
        details = await reader.tracker.tracker.get_view_count_details("story", ids)
    finally:
        await reader.aclose()
    assert {i: (c.database, c.pending, c.syncing) for i, c in details.items()} == {
        i: (n, 0, 0) for i, n in expected.items()
    }


async def test_the_command_on_a_dead_cluster_exits_2_with_one_line(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"redis+cluster://127.0.0.1:{free_port()}"
    environment.setenv("VIEWMW_REDIS_URL", dead)
    for argv in (["sync"], ["sync", "--force"], ["sync", "--stats"]):
        code = await _run_main(argv)
        out = capsys.readouterr()
        assert (code, out.out) == (EXIT_UNAVAILABLE, ""), argv
        [line] = out.err.splitlines()
        assert line.startswith(f"viewmw: the Redis Cluster at {dead} is not reachable (")
        assert line.endswith("or set VIEWMW_REDIS_URL.")
    # health reports instead: every check in its document, the exit status for a script.
    assert await _run_main(["health", "--json"]) == EXIT_UNAVAILABLE
    out = capsys.readouterr()
    redis_check = json.loads(out.out)["checks"]["redis"]
    assert (out.err, redis_check["ok"]) == ("", False)
    assert redis_check["detail"].startswith(
        "failed: RedisClusterException: Redis Cluster cannot be connected"
    )


async def _run_main(argv: list[str]) -> int:
    # main() runs asyncio.run: on a thread of its own, as it would in the command's process.
    return await asyncio.to_thread(main, argv)


async def test_an_app_on_a_dead_cluster_starts_and_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = Settings(
        redis_url=f"redis+cluster://{dead}",
        database_url=f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3",
        secret=SECRET,
    )
    built = BuiltTracker(settings)
    with caplog.at_level(logging.WARNING, logger="viewmw"):
        await built.startup()
    try:
        # The page is served without a count (the outage path: the breaker counts the failure).
        result = await built.tracker.track_view("story", "1", "user:1")
    finally:
        await built.aclose()
    assert (result.counted, result.count) == (False, None)
    startup = [r for r in caplog.records if "start-up" in r.getMessage()]
    assert [
        (r.getMessage().startswith(f"viewmw: the Redis Cluster at {dead} "), r.exc_info)
        for r in startup
    ] == [(True, None)]
    assert "start its primaries or set VIEWMW_REDIS_URL" in startup[0].getMessage()
