"""The readiness check: each dependency down in turn, an old sync, a large backlog; the endpoint.

On the real Redis and PostgreSQL; a server that is down is a URL at a closed port. The age of the
last sync is measured against an injected clock moved past the threshold.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio import Redis

from tests.support import FakeClock
from viewmw import Settings, Store, ViewSync, ViewTracker
from viewmw.health import (
    BACKLOG,
    DATABASE,
    LAST_SYNC,
    OUTBOX,
    REDIS,
    HealthEndpoint,
    HealthReport,
    HealthThresholds,
    check_health,
)

REDIS_DOWN = "redis://127.0.0.1:1/0"
DATABASE_DOWN = "postgresql://postgres@127.0.0.1:1/viewmw"
ALL_CHECKS = [REDIS, DATABASE, BACKLOG, LAST_SYNC, OUTBOX]


def failing(report: HealthReport) -> list[str]:
    return [check.name for check in report.checks if not check.ok]


@pytest.fixture
def now() -> FakeClock:
    """A clock at the real time: the ledger's ``committed_at`` is the database's real time."""
    return FakeClock(time.time())


async def count_and_sync(
    redis: Redis, store: Store, settings: Settings, contents: int, *, sync: bool
) -> None:
    tracker = ViewTracker(redis, store, settings, pipelining=False)
    for n in range(contents):
        assert (await tracker.track_view("article", f"a{n}", "user:1")).counted
    if sync:
        report = await ViewSync(redis, store, settings).run()
        assert report.views == contents


@pytest.fixture
async def down_redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_DOWN)
    yield client
    await client.aclose()


@pytest.fixture
async def down_store(settings: Settings) -> AsyncIterator[Store]:
    store = Store.from_settings(settings.replace(database_url=DATABASE_DOWN))
    yield store
    await store.close()


async def test_a_deployment_that_synced_is_healthy(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, now: FakeClock
) -> None:
    await count_and_sync(real_redis, pg_store, settings, 2, sync=True)
    report = await check_health(real_redis, pg_store, settings, clock=now)
    assert report.ok and not report.unreachable
    assert [check.name for check in report.checks] == ALL_CHECKS
    assert report.check(BACKLOG).value == 0
    assert report.check(OUTBOX).value == 0
    age = report.check(LAST_SYNC).value
    assert age is not None and 0 <= age < HealthThresholds().max_sync_age_seconds


async def test_no_sync_yet_is_healthy_and_says_so(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings
) -> None:
    report = await check_health(real_redis, pg_store, settings)
    assert report.ok
    assert report.check(LAST_SYNC).detail == "no sync has committed yet"


async def test_redis_down_fails_redis_and_the_backlog(
    down_redis: Redis, pg_store: Store, settings: Settings
) -> None:
    report = await check_health(down_redis, pg_store, settings)
    assert not report.ok and report.unreachable
    assert failing(report) == [REDIS, BACKLOG]
    assert report.check(REDIS).detail.startswith("failed: ConnectionError: ")


async def test_database_down_fails_the_database_the_last_sync_and_the_outbox(
    real_redis: aioredis.Redis, down_store: Store, settings: Settings
) -> None:
    report = await check_health(real_redis, down_store, settings)
    assert not report.ok and report.unreachable
    assert failing(report) == [DATABASE, LAST_SYNC, OUTBOX]
    assert report.check(DATABASE).detail.startswith("failed: ")


async def test_an_old_last_sync_is_unhealthy(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, now: FakeClock
) -> None:
    await count_and_sync(real_redis, pg_store, settings, 1, sync=True)
    limit = HealthThresholds().max_sync_age_seconds
    now.advance(limit + 60)
    report = await check_health(real_redis, pg_store, settings, clock=now)
    assert not report.ok and not report.unreachable
    assert failing(report) == [LAST_SYNC]
    age = report.check(LAST_SYNC).value
    assert age is not None and age > limit


async def test_a_large_backlog_is_unhealthy(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings
) -> None:
    await count_and_sync(real_redis, pg_store, settings, 3, sync=False)
    thresholds = HealthThresholds(max_pending_contents=2)
    report = await check_health(real_redis, pg_store, settings, thresholds)
    assert failing(report) == [BACKLOG]
    assert report.check(BACKLOG).value == 3
    assert report.check(BACKLOG).detail == "3 contents pending (limit 2)"
    relaxed = await check_health(real_redis, pg_store, settings, HealthThresholds(3))
    assert relaxed.ok


async def test_the_endpoint_answers_200_then_503_as_json(
    real_redis: aioredis.Redis, pg_store: Store, down_redis: Redis, settings: Settings
) -> None:
    healthy = HealthEndpoint(real_redis, pg_store, settings)
    unhealthy = HealthEndpoint(down_redis, pg_store, settings)
    for endpoint, status in ((healthy, 200), (unhealthy, 503)):
        transport = httpx.ASGITransport(app=endpoint)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/healthz")
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["ok"] is (status == 200)
        assert list(body["checks"]) == ALL_CHECKS
        assert body["checks"][REDIS]["ok"] is (status == 200)
