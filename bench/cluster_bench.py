"""Views per second and Redis memory per view on a local 3-primary Redis Cluster,
against one Redis server of the same build, on the same machine, in one run; the memory of the
viewers' own keys (sessions and daily counters) per (viewer, content) pair; and the time of
two history reads on the views each round leaves: ``views_many`` of 100 ids and ``top(limit=10)``
of the last 7 days (Redis' side alone: no database, so the figures are the Redis calls').

``python -m bench.cluster_bench`` (needs ``redis-server`` and ``redis-cli``, as the cluster tests
do). Rounds alternate between the two, each on flushed servers; the figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.cluster_support import local_cluster, local_server
from viewmw import NodeConnections, Period, ScriptConnection, Settings, ViewStats, ViewTracker
from viewmw.assembly import connect_redis_cluster

CONTENTS = 5_000
CONTENTS_PER_VIEWER = 5
WAVE = 500  # views offered at once, as concurrent requests would
READS = 20  # times each history read is timed per round (the median is kept)
LEADERS = 60  # contents with distinct counts for the ranking
# The keys a viewer leaves, one set per (viewer, content) pair it reads: everything else is
# per content (counters, days, sketches, rankings) and shared by all of the content's viewers.
VIEWER_KEYS = (b"viewed:", b"daily_views:")


async def _used_memory(redis: Any, clustered: bool) -> int:
    if clustered:
        info = await redis.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(node["used_memory"]) for node in info.values())
    return int((await redis.info("memory"))["used_memory"])


async def _flush(redis: Any, clustered: bool) -> None:
    if clustered:
        await redis.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        await redis.flushall()


def _drop_content_keys(nodes: list[redis.Redis]) -> None:
    """Delete every key but the viewers' own on each node (``nodes``: every primary). ``DEL``,
    not ``UNLINK``: a large value's memory must be freed before ``INFO memory`` is read."""
    for node in nodes:
        doomed = [key for key in node.scan_iter(count=1000) if not key.startswith(VIEWER_KEYS)]
        # One key per command: a cluster node refuses keys of several slots in one.
        for start in range(0, len(doomed), 1000):
            with node.pipeline(transaction=False) as pipe:
                for key in doomed[start : start + 1000]:
                    pipe.delete(key)
                pipe.execute()


async def _bytes_per_pair(
    client: Any, nodes: list[redis.Redis], tracker: ViewTracker, views: int, offset: int
) -> float:
    """Bytes of the viewers' own keys per (viewer, content) pair, on a flushed server: the
    memory ``views`` views of new pairs add, over the same contents, after as many views made
    the keyspace's tables as large as the content keys make them (Redis keeps a table's size
    while it is over a tenth full). Every per-content key is deleted before each reading (its
    memory is per content, not per pair); ``INFO memory`` counts what the keys' TTLs cost too."""
    clustered = isinstance(client, RedisCluster)
    await _flush(client, clustered)
    await _offer(tracker, range(offset, offset + views))
    await tracker.drain()
    _drop_content_keys(nodes)
    before = await _used_memory(client, clustered)
    await _offer(tracker, range(offset + views, offset + 2 * views))
    await tracker.drain()
    _drop_content_keys(nodes)
    return (await _used_memory(client, clustered) - before) / views


async def _offer(tracker: ViewTracker, numbers: range) -> None:
    """View ``n`` of ``numbers``: content ``n % CONTENTS`` by viewer ``n // CONTENTS_PER_VIEWER``,
    ``WAVE`` views at once, as concurrent requests would offer them."""
    for start in range(numbers.start, numbers.stop, WAVE):
        await asyncio.gather(
            *(
                tracker.track_view("story", n % CONTENTS, f"anon:{n // CONTENTS_PER_VIEWER:016d}")
                for n in range(start, min(start + WAVE, numbers.stop))
            )
        )


async def _reads(tracker: ViewTracker) -> tuple[float, float]:
    """Median seconds of ``views_many`` of 100 ids and of ``top(limit=10)`` of 7 days."""
    # Leaders with distinct counts (content hN has N views), so that the ranking is settled in
    # one round: the round's own contents have a few views each, all tied.
    offers = [
        (f"h{n}", f"anon:h{n}-{viewer}") for n in range(1, LEADERS + 1) for viewer in range(n)
    ]
    for start in range(0, len(offers), WAVE):
        await asyncio.gather(
            *(tracker.track_view("story", *offer) for offer in offers[start : start + WAVE])
        )
    await tracker.drain()
    stats = ViewStats.from_tracker(tracker)
    ids = [str(n) for n in range(100)]
    week = Period.last_days(7)
    await stats.views_many("story", ids, week)  # scripts loaded, connections open
    await stats.top("story", week, 10)
    many, top = [], []
    for _ in range(READS):
        started = time.perf_counter()
        await stats.views_many("story", ids, week)
        many.append(time.perf_counter() - started)
        started = time.perf_counter()
        await stats.top("story", week, 10)
        top.append(time.perf_counter() - started)
    return statistics.median(many), statistics.median(top)


async def _round(
    client: Any, nodes: list[redis.Redis], settings: Settings, views: int, offset: int
) -> tuple[float, float, float, float, float]:
    """Views per second and bytes of Redis memory (every node) per view, for ``views`` views;
    then the seconds of the two history reads on what they left; then the bytes per pair of the
    viewers' own keys (``nodes``: a plain client of every primary)."""
    clustered = settings.redis_cluster is not None
    await _flush(client, clustered)
    # Views go as a built tracker sends them: on a lean connection to the one server, on one
    # such connection per primary of the cluster.
    assert settings.redis_url is not None
    connection = (
        NodeConnections(client, reply_timeout=30.0)
        if clustered
        else ScriptConnection.from_url(settings.redis_url, reply_timeout=30.0)
    )
    tracker = ViewTracker(client, None, settings, script_connection=connection)
    for n in range(200):  # warm up: scripts loaded on every node, shared keys made
        await tracker.track_view("story", f"warm{n}", "user:warmup")
    before = await _used_memory(client, clustered)
    started = time.perf_counter()
    await _offer(tracker, range(offset, offset + views))
    elapsed = time.perf_counter() - started
    await tracker.drain()
    after = await _used_memory(client, clustered)
    views_many, top = await _reads(tracker)
    per_pair = await _bytes_per_pair(client, nodes, tracker, views, offset)
    if connection is not None:
        await connection.aclose()
    return views / elapsed, (after - before) / views, views_many, top, per_pair


async def run_cluster_bench(views: int, rounds: int) -> dict[str, dict[str, float]]:
    """Alternating rounds on one server and on the cluster; medians per backend."""
    measures = (
        "views_per_second",
        "bytes_per_view",
        "views_many_seconds",
        "top_seconds",
        "bytes_per_pair",
    )
    figures: dict[str, dict[str, list[float]]] = {
        name: {measure: [] for measure in measures} for name in ("single", "cluster")
    }
    with local_server() as url, local_cluster() as cluster:
        # Generous deadlines: a late reply is not what this measures.
        single_settings = Settings(redis_url=url, redis_timeout=30.0)
        cluster_settings = Settings(redis_url=cluster.url, redis_timeout=30.0)
        single = aioredis.Redis.from_url(url)
        clustered = connect_redis_cluster(cluster_settings)
        single_nodes = [redis.Redis.from_url(url)]
        cluster_nodes = [cluster.client(node) for node in cluster.nodes]
        try:
            for round_ in range(rounds):
                for name, client, nodes, settings in (
                    ("single", single, single_nodes, single_settings),
                    ("cluster", clustered, cluster_nodes, cluster_settings),
                ):
                    measured = await _round(client, nodes, settings, views, round_ * views)
                    for measure, value in zip(measures, measured, strict=True):
                        figures[name][measure].append(value)
        finally:
            await single.aclose()
            await clustered.aclose()
            for node in single_nodes + cluster_nodes:
                node.close()
    return {
        name: {key: statistics.median(values) for key, values in measured.items()}
        for name, measured in figures.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--views", type=int, default=20_000, help="views per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run_cluster_bench(args.views, args.rounds))
    single, cluster = result["single"], result["cluster"]
    print(
        f"one server: {single['views_per_second']:,.0f} views/s, "
        f"{single['bytes_per_view']:.0f} B of Redis memory per view (every key it leaves)"
    )
    print(
        f"3-primary cluster: {cluster['views_per_second']:,.0f} views/s, "
        f"{cluster['bytes_per_view']:.0f} B of Redis memory per view (every key it leaves)"
    )
    print(
        f"the viewers' own keys per (viewer, content) pair: one server "
        f"{single['bytes_per_pair']:.1f} B, cluster {cluster['bytes_per_pair']:.1f} B"
    )
    print(
        f"cluster / one server: "
        f"{cluster['views_per_second'] / single['views_per_second']:.2f}x views/s"
    )
    for measure, read in (
        ("views_many_seconds", "views_many of 100 ids"),
        ("top_seconds", "top 10 of 7 days"),
    ):
        print(
            f"{read}: one server {single[measure] * 1000:.2f} ms, cluster "
            f"{cluster[measure] * 1000:.2f} ms ({cluster[measure] / single[measure]:.2f}x the time)"
        )


if __name__ == "__main__":
    main()
