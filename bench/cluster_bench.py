"""Views per second and Redis memory per view on a local 3-primary Redis Cluster,
against one Redis server of the same build, on the same machine, in one run.

``python -m bench.cluster_bench`` (needs ``redis-server`` and ``redis-cli``, as the cluster tests
do). Rounds alternate between the two, each on flushed servers; the figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.asgi_support import free_port
from tests.cluster_support import local_cluster
from viewmw import Settings, ViewTracker
from viewmw.assembly import connect_redis_cluster

CONTENTS = 5_000
CONTENTS_PER_VIEWER = 5
WAVE = 500  # views offered at once, as concurrent requests would


@contextmanager
def single_server() -> Iterator[str]:
    """One ``redis-server`` of the cluster's build, without persistence, on a free port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    subprocess.run(
                        ["redis-cli", "-p", str(port), "ping"], check=True, capture_output=True
                    )
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait()


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


async def _round(redis: Any, settings: Settings, views: int, offset: int) -> tuple[float, float]:
    """Views per second and bytes of Redis memory (every node) per view, for ``views`` views."""
    clustered = settings.redis_cluster is not None
    await _flush(redis, clustered)
    tracker = ViewTracker(redis, None, settings)
    for n in range(200):  # warm up: scripts loaded on every node, shared keys made
        await tracker.track_view("story", f"warm{n}", "user:warmup")
    before = await _used_memory(redis, clustered)
    started = time.perf_counter()
    for start in range(offset, offset + views, WAVE):
        await asyncio.gather(
            *(
                tracker.track_view("story", n % CONTENTS, f"anon:{n // CONTENTS_PER_VIEWER:016d}")
                for n in range(start, min(start + WAVE, offset + views))
            )
        )
    elapsed = time.perf_counter() - started
    await tracker.drain()
    after = await _used_memory(redis, clustered)
    return views / elapsed, (after - before) / views


async def run_cluster_bench(views: int, rounds: int) -> dict[str, dict[str, float]]:
    """Alternating rounds on one server and on the cluster; medians per backend."""
    figures: dict[str, dict[str, list[float]]] = {
        "single": {"views_per_second": [], "bytes_per_view": []},
        "cluster": {"views_per_second": [], "bytes_per_view": []},
    }
    with single_server() as url, local_cluster() as cluster:
        # Generous deadlines: a late reply is not what this measures.
        single_settings = Settings(redis_url=url, redis_timeout=30.0)
        cluster_settings = Settings(redis_url=cluster.url, redis_timeout=30.0)
        single = aioredis.Redis.from_url(url)
        clustered = connect_redis_cluster(cluster_settings)
        try:
            for round_ in range(rounds):
                for name, redis, settings in (
                    ("single", single, single_settings),
                    ("cluster", clustered, cluster_settings),
                ):
                    rate, per_pair = await _round(redis, settings, views, round_ * views)
                    figures[name]["views_per_second"].append(rate)
                    figures[name]["bytes_per_view"].append(per_pair)
        finally:
            await single.aclose()
            await clustered.aclose()
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
        f"cluster / one server: "
        f"{cluster['views_per_second'] / single['views_per_second']:.2f}x views/s"
    )


if __name__ == "__main__":
    main()
