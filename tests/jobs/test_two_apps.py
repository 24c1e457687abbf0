"""Two apps with two key prefixes on one Redis, which is also their broker: each app's worker
takes only its own app's sync messages and syncs only its own views.

Real ``dramatiq viewmw.jobs`` processes, each configured only by its app's ``VIEWMW_KEY_PREFIX``:
the queue name and the broker namespace follow from it. Each app has its own SQLite database, so a
view synced by the wrong worker would show.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dramatiq
import pytest
import redis.asyncio as aioredis

from tests.jobs.test_worker_e2e import WorkerProcess, start_worker, wait_until
from tests.support import REDIS_URL, FakeClock
from viewmw import KeySchema, Settings, Store, ViewTracker
from viewmw.jobs.broker import make_broker
from viewmw.jobs.settings import WorkerSettings

__all__ = ["start_worker"]  # a fixture, imported to be used here

pytestmark = pytest.mark.slow

PREFIXES = ("app1:", "app2:")
VIEWS = {"app1:": 3, "app2:": 2}


def app_settings(prefix: str, tmp_path: Path) -> Settings:
    name = prefix.rstrip(":")
    return Settings(
        key_prefix=prefix,
        redis_url=REDIS_URL,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/{name}.sqlite3",
    )


def enqueue_sync(settings: Settings) -> None:
    """What ``viewmw sync --enqueue`` sends for the app of ``settings``."""
    worker = WorkerSettings.from_env(settings, {"VIEWMW_BROKER_URL": REDIS_URL})
    broker = make_broker(worker)
    try:
        broker.enqueue(
            dramatiq.Message(
                queue_name=worker.queue_name,
                actor_name="sync_view_counts",
                args=(),
                kwargs={},
                options={},
            )
        )
    finally:
        broker.close()


async def test_each_apps_worker_syncs_only_its_own_views(
    real_redis: aioredis.Redis, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    apps = {prefix: app_settings(prefix, tmp_path) for prefix in PREFIXES}
    queues = {prefix: settings.dramatiq_queue_name for prefix, settings in apps.items()}
    assert queues == {"app1:": "viewmw-app1", "app2:": "viewmw-app2"}
    stores = {prefix: Store.from_settings(settings) for prefix, settings in apps.items()}
    try:
        for prefix, settings in apps.items():
            await stores[prefix].create_tables()
            tracker = ViewTracker(real_redis, stores[prefix], settings, clock=FakeClock())
            for n in range(VIEWS[prefix]):
                assert (await tracker.track_view("task", "shared-id", f"user:{n}")).counted

        async def synced(prefix: str) -> bool:
            return await stores[prefix].read_count("task", "shared-id") == VIEWS[prefix]

        async def pending(prefix: str) -> int:
            return int(await real_redis.get(KeySchema(prefix).pending("task", "shared-id")) or 0)

        # app1's sync is queued before any worker runs; app2's worker starts and gets its own.
        enqueue_sync(apps["app1:"])
        second = start_worker(REDIS_URL, VIEWMW_KEY_PREFIX="app2:", **database_of(apps["app2:"]))
        enqueue_sync(apps["app2:"])
        await wait_until(lambda: synced("app2:"), "app2's sync", second)
        assert await pending("app2:") == 0
        # app1's message was never app2's worker's to take: app1's views still wait.
        assert await pending("app1:") == VIEWS["app1:"]
        assert await stores["app1:"].read_count("task", "shared-id") == 0
        assert await real_redis.hlen(f"dramatiq-app1:{queues['app1:']}.msgs") == 1

        first = start_worker(REDIS_URL, VIEWMW_KEY_PREFIX="app1:", **database_of(apps["app1:"]))
        await wait_until(lambda: synced("app1:"), "app1's sync", first)
        assert await pending("app1:") == 0
        # Each database holds its own app's views only, once.
        for prefix in PREFIXES:
            assert await stores[prefix].read_count("task", "shared-id") == VIEWS[prefix]
            assert len(await stores[prefix].last_batches()) == 1
    finally:
        for store in stores.values():
            await store.close()


def database_of(settings: Settings) -> dict[str, str]:
    return {"VIEWMW_DATABASE_URL": settings.database_url, "VIEWMW_CONTENT_TABLES": ""}
