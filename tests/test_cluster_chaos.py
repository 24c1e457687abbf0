"""Conservation on a real local Redis Cluster under everything at once: concurrent traffic on the
outage path (a generic content type, whose rows the sync creates), two sync loops racing each
other, and one primary killed with SIGKILL and restarted while both go on
(tests/cluster_support.py). At the end, after the outbox is replayed
and a last sync has run, every content's database count holds every view that was counted or
kept, and no view twice: exactly, but for the views whose call was cut by the kill (their
outcome is unknown: counted once or not at all)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.cluster_support import LocalCluster, local_cluster
from tests.support import FakeClock
from tests.test_cluster_outage import OutagePath, outage_path, replay_when_back
from viewmw import Settings, Store, SyncError, ViewSync
from viewmw.outage.replayer import Replayer

CONTENTS = 60
WAVES, WAVE = 24, 40  # views offered 40 at a time
KILL_AFTER, RESTART_AFTER = 8, 14  # waves


async def test_traffic_racing_syncs_and_a_killed_primary_lose_and_double_nothing(
    pg_store: Store, clock: FakeClock
) -> None:
    with local_cluster(persistent=True) as cluster:
        async with outage_path(cluster, pg_store, clock, node_connections=True) as path:
            await _traffic_syncs_and_a_kill(cluster, path, pg_store, clock)


async def _traffic_syncs_and_a_kill(
    cluster: LocalCluster, path: OutagePath, store: Store, clock: FakeClock
) -> None:
    resilient, tracker, outbox, redis = path.resilient, path.tracker, path.outbox, path.redis
    assert path.nodes is not None and path.node_clock is not None
    settings = path.settings
    kept: Counter[str] = Counter()  # counted, or written to the outbox
    unknown: Counter[str] = Counter()  # cut by the kill: counted once or not at all
    stop_syncing = asyncio.Event()
    syncs = [
        asyncio.create_task(_sync_until(stop_syncing, redis, store, settings, clock))
        for _ in range(2)
    ]
    try:
        rng = random.Random(5)
        dead = cluster.nodes[1]
        for wave in range(WAVES):
            path.node_clock.advance(1.0)  # a wave a second: the primaries' breakers' back-off
            if wave == KILL_AFTER:
                await asyncio.to_thread(cluster.kill, dead)
            restart = (
                asyncio.create_task(asyncio.to_thread(cluster.restart, dead))
                if wave == RESTART_AFTER
                else None
            )
            offers = [str(rng.randrange(CONTENTS)) for _ in range(WAVE)]
            results = await asyncio.gather(
                *(
                    resilient.track_view("task", content_id, f"user:{rng.randrange(500)}")
                    for content_id in offers
                )
            )
            for content_id, result in zip(offers, results, strict=True):
                if result.counted or result.queued:
                    kept[content_id] += 1
                else:
                    unknown[content_id] += 1
            if restart is not None:
                await restart  # traffic went on while the primary came back
        # The kill was felt: by the dead primary's own breaker, and by the process's when
        # three of its first failures came in a row.
        felt = resilient.breaker.opened_count + path.nodes.breakers[dead.address].opened_count
        assert felt >= 1
    finally:
        stop_syncing.set()
        ended = await asyncio.gather(*syncs, return_exceptions=True)
    assert ended == [None, None], ended
    # A sync the kill stopped could not release the lock on the dead node: it expires.
    await redis.delete(settings.content_shards().schemas[0].sync_lock)

    await replay_when_back(Replayer(tracker, outbox), path.node_clock)
    assert await outbox.oldest(1) == []
    await tracker.drain()
    ids = [str(n) for n in range(CONTENTS)]
    # The syncs racing the traffic had moved views already.
    assert sum([await store.read_count("task", i) for i in ids]) > 0
    await _last_sync(redis, store, settings, clock)
    for content_id in ids:
        stored = await store.read_count("task", content_id)
        low, high = kept[content_id], kept[content_id] + unknown[content_id]
        assert low <= stored <= high, (content_id, low, stored, high)
    # Nothing is left between Redis and the database: what a page shows is stored.
    shown = await tracker.get_view_counts("task", ids)
    assert shown == {i: await store.read_count("task", i) for i in ids}


async def _sync_until(
    stop: asyncio.Event, redis: object, store: Store, settings: Settings, clock: FakeClock
) -> None:
    """Run syncs back to back until ``stop``; a sync that a dead node or the other sync stops
    is simply followed by the next, as the worker retries whatever a run raised (redis-py's
    cluster client itself can fail with an AttributeError while a node dies). A short lock:
    one whose renewal or release the kill cut expires soon, and the other loop's sync takes
    over while the first may still be running."""
    sync = ViewSync(
        cast(Redis, redis), store, settings, clock=clock, batch_contents=20, lock_seconds=1.0
    )
    while not stop.is_set():
        with contextlib.suppress(SyncError, RedisError, OSError, AttributeError):
            await sync.run()
        # Pacing, not timing: let the traffic's turns in between two runs.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def _last_sync(redis: object, store: Store, settings: Settings, clock: FakeClock) -> None:
    """A complete sync, once the cluster takes every step again."""
    for _attempt in range(50):
        try:
            report = await ViewSync(cast(Redis, redis), store, settings, clock=clock).run()
        except (SyncError, RedisError):
            await asyncio.sleep(0.1)
            continue
        assert not report.already_running
        return
    pytest.fail("no sync completed after the restart")
