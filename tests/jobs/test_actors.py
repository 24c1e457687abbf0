"""The actors on Dramatiq's stub broker with an in-process worker, on the real Redis and PostgreSQL.

The worker runs the actors exactly as ``dramatiq viewmw.jobs`` does (AsyncIO middleware, retries,
time limit, the failure actor); only the broker is in memory.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis
from dramatiq.middleware.asyncio import AsyncIO
from periodiq import PeriodiqMiddleware
from sqlalchemy.exc import OperationalError

from tests.jobs import (
    KEYS,
    QUEUE,
    Content,
    add_stories,
    database_counts,
    ledger_size,
    record,
    redis_counts,
)
from tests.support import REDIS_URL, FakeClock
from viewmw import Outbox, OutboxEvent, Settings, Store, ViewTracker
from viewmw.cli import main
from viewmw.jobs import broker, cleanup_view_tracking, notify_sync_failure, sync_view_counts
from viewmw.jobs.broker import worker_settings
from viewmw.mapping import record_mapping
from viewmw.sync import SyncReport, ViewSync

if TYPE_CHECKING:
    from tests.jobs.conftest import ActorSync, StubWorker

VIEWS: dict[Content, int] = {("story", "1"): 3, ("story", "2"): 1, ("article", "a-1"): 2}
CONTENTS = list(VIEWS)
TOTAL = sum(VIEWS.values())

FAILURES: list[dict[str, Any]] = []


def record_failure(details: dict[str, Any]) -> None:
    """The failure hook the worker is configured with (``VIEWMW_FAILURE_HOOK``)."""
    FAILURES.append(details)


@pytest.fixture(autouse=True)
def _no_failures_yet() -> None:
    FAILURES.clear()


@pytest.fixture
async def viewed(pg_tracker: ViewTracker, pg_store: Store) -> ViewTracker:
    """:data:`VIEWS` recorded through the tracker, nothing synced yet."""
    await add_stories(pg_store, [1, 2])
    await record(pg_tracker, VIEWS)
    assert await redis_counts(pg_tracker, CONTENTS) == VIEWS
    return pg_tracker


class FlakyDatabase:
    """Makes ``Store.commit_batch`` raise the next ``failures`` times, then work again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: float) -> None:
        self.failures = failures
        self.calls = 0
        original = Store.commit_batch

        async def commit_batch(store: Store, *args: Any, **kwargs: Any) -> bool:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise OperationalError(
                    "INSERT INTO viewmw_sync_batches",
                    {},
                    ConnectionRefusedError("database is down"),
                )
            return await original(store, *args, **kwargs)

        monkeypatch.setattr(Store, "commit_batch", commit_batch)


async def assert_synced(tracker: ViewTracker, store: Store) -> None:
    """Every view is in the database once; nothing is left in Redis; the sync is settled."""
    assert await database_counts(store, CONTENTS) == VIEWS
    assert await redis_counts(tracker, CONTENTS) == dict.fromkeys(CONTENTS, 0)
    assert await tracker.get_view_counts("story", ["1", "2"]) == {"1": 3, "2": 1}
    redis = tracker.redis
    assert not await redis.exists(KEYS.sync_batch, KEYS.sync_lock)
    assert not [key async for key in redis.scan_iter(match=KEYS.sync_batch_items("*"))]
    assert not await redis.scard(KEYS.dirty)


def test_actors_are_configured_from_the_environment() -> None:
    assert sync_view_counts.queue_name == cleanup_view_tracking.queue_name == QUEUE
    options = sync_view_counts.options
    assert options["max_retries"] == 3
    assert options["min_backoff"] == worker_settings.retry_min_backoff_ms == 10
    assert options["time_limit"] == worker_settings.sync_time_limit_ms == 120_000
    assert options["on_retry_exhausted"] == notify_sync_failure.actor_name
    assert notify_sync_failure.options["max_retries"] == 0
    assert worker_settings.failure_hook == f"{__name__}:record_failure"
    kinds = {type(middleware) for middleware in broker.middleware}
    assert {AsyncIO, PeriodiqMiddleware} <= kinds


async def test_sync_actor_moves_views_into_the_database(
    viewed: ViewTracker, pg_store: Store, stub_worker: StubWorker, actor_sync: ActorSync
) -> None:
    sync_view_counts.send()
    await stub_worker.drain()

    await assert_synced(viewed, pg_store)
    assert [report.views for report in actor_sync.reports] == [TOTAL]
    assert await ledger_size(pg_store) == 1
    assert FAILURES == []


async def test_a_database_failing_twice_succeeds_on_the_third_try(
    viewed: ViewTracker,
    pg_store: Store,
    stub_worker: StubWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = FlakyDatabase(monkeypatch, failures=2)

    sync_view_counts.send_with_options(min_backoff=10, max_backoff=40)
    await stub_worker.drain()

    assert database.calls == 3
    await assert_synced(viewed, pg_store)
    assert await ledger_size(pg_store) == 1
    assert FAILURES == []


async def test_a_database_down_for_every_attempt_notifies_once_and_keeps_the_views(
    viewed: ViewTracker,
    pg_store: Store,
    real_redis: aioredis.Redis,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = FlakyDatabase(monkeypatch, failures=math.inf)

    message = sync_view_counts.send_with_options(min_backoff=10, max_backoff=40)
    await stub_worker.drain()

    assert database.calls == 1 + 3  # the first attempt and three retries
    assert len(FAILURES) == 1
    failure = FAILURES[0]
    assert failure["actor"] == sync_view_counts.actor_name
    assert failure["message_id"] == message.message_id
    assert failure["retries"] == 3
    assert failure["error"] == (
        "sqlalchemy.exc.OperationalError: (builtins.ConnectionRefusedError) database is down"
    )
    # Nothing is lost: every view is still in Redis, in the batch kept for recovery.
    assert await redis_counts(viewed, CONTENTS) == VIEWS
    batch_id = (await real_redis.hget(KEYS.sync_batch, "id") or b"").decode()
    items = await real_redis.hgetall(KEYS.sync_batch_items(batch_id))
    assert {KEYS.split_member(k.decode()): int(v) for k, v in items.items()} == VIEWS  # type: ignore[union-attr]
    assert await real_redis.hexists(KEYS.sync_batch, "id")
    assert not await real_redis.exists(KEYS.sync_lock)
    assert await database_counts(pg_store, CONTENTS) == dict.fromkeys(CONTENTS, 0)
    assert await ledger_size(pg_store) == 0

    # The database is back: the next sync finishes the kept batch.
    database.failures = 0
    sync_view_counts.send()
    await stub_worker.drain()
    await assert_synced(viewed, pg_store)
    assert actor_sync.reports[-1].recovered_batches == 1
    assert len(FAILURES) == 1


async def test_a_duplicated_message_counts_once(
    viewed: ViewTracker, pg_store: Store, stub_worker: StubWorker, actor_sync: ActorSync
) -> None:
    message = sync_view_counts.message()
    broker.enqueue(message)
    broker.enqueue(message)  # the same message id, delivered twice
    await stub_worker.drain()

    assert len(actor_sync.reports) == 2
    assert sum(report.views for report in actor_sync.reports) == TOTAL
    await assert_synced(viewed, pg_store)
    assert await ledger_size(pg_store) == 1


async def test_two_messages_at_once_sync_once(
    viewed: ViewTracker, pg_store: Store, stub_worker: StubWorker, actor_sync: ActorSync
) -> None:
    # The first sync to take the lock waits before its commit until the other one has seen the
    # lock taken, so the two really overlap.
    other_was_busy = asyncio.Event()

    async def on_step(name: str) -> None:
        if name == "before_commit":
            await asyncio.wait_for(other_was_busy.wait(), timeout=30)

    def on_report(report: SyncReport) -> None:
        if report.already_running:
            other_was_busy.set()

    actor_sync.on_step, actor_sync.on_report = on_step, on_report
    sync_view_counts.send()
    sync_view_counts.send()
    await stub_worker.drain()

    busy = [report for report in actor_sync.reports if report.already_running]
    done = [report for report in actor_sync.reports if not report.already_running]
    assert len(busy) == 1 and len(done) == 1
    assert done[0].views == TOTAL
    await assert_synced(viewed, pg_store)
    assert await ledger_size(pg_store) == 1


async def test_a_message_redelivered_after_a_crash_between_commit_and_settle_counts_once(
    viewed: ViewTracker, pg_store: Store, stub_worker: StubWorker, actor_sync: ActorSync
) -> None:
    crashes: list[str] = []

    async def on_step(name: str) -> None:
        if name == "committed" and not crashes:
            crashes.append(name)
            raise RuntimeError("worker died after the commit")

    actor_sync.on_step = on_step
    sync_view_counts.send()
    await stub_worker.drain()

    assert crashes == ["committed"]
    # The retry found the batch in the ledger: it settled it without adding it again.
    assert [(r.recovered_batches, r.batches) for r in actor_sync.reports] == [(1, 0)]
    await assert_synced(viewed, pg_store)
    assert await ledger_size(pg_store) == 1


async def test_a_sync_over_its_time_limit_is_stopped_and_loses_nothing(
    viewed: ViewTracker,
    pg_store: Store,
    real_redis: aioredis.Redis,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
) -> None:
    hangs: list[str] = []

    async def on_step(name: str) -> None:
        if name == "before_commit" and not hangs:
            hangs.append(name)
            await asyncio.sleep(60)  # a database that never answers

    actor_sync.on_step = on_step
    sync_view_counts.send_with_options(time_limit=100, max_retries=0)
    await stub_worker.drain()

    assert hangs == ["before_commit"]
    assert len(FAILURES) == 1
    assert FAILURES[0]["error"].startswith("dramatiq.middleware.time_limit.TimeLimitExceeded")
    assert not await real_redis.exists(KEYS.sync_lock)  # released on the way out
    assert await real_redis.hexists(KEYS.sync_batch, "id")
    assert await redis_counts(viewed, CONTENTS) == VIEWS

    sync_view_counts.send()
    await stub_worker.drain()
    await assert_synced(viewed, pg_store)


def _names(keys: Iterable[bytes | str]) -> set[str]:
    return {key.decode() if isinstance(key, bytes) else key for key in keys}


def _daily_keys(keys: Iterable[bytes | str], day: str) -> list[str]:
    return sorted(k for k in _names(keys) if k.startswith("daily_views:") and k.endswith(day))


async def test_cleanup_removes_previous_days_daily_counters(
    pg_tracker: ViewTracker,
    real_redis: aioredis.Redis,
    clock: FakeClock,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
) -> None:
    yesterday = datetime.fromtimestamp(clock(), pg_tracker.settings.zone).date().isoformat()
    await record(pg_tracker, {("article", "old"): 3})
    clock.advance(86400)
    today = datetime.fromtimestamp(clock(), pg_tracker.settings.zone).date().isoformat()
    await record(pg_tracker, {("article", "new"): 2})
    actor_sync.clock = clock
    keys_before = await real_redis.keys("*")
    assert len(_daily_keys(keys_before, yesterday)) == 3
    assert len(_daily_keys(keys_before, today)) == 2

    cleanup_view_tracking.send()
    await stub_worker.drain()

    keys_after = await real_redis.keys("*")
    assert _daily_keys(keys_after, yesterday) == []
    assert _daily_keys(keys_after, today) == _daily_keys(keys_before, today)
    # Only daily counters go: pending views and sessions stay.
    assert _names(keys_after) == _names(keys_before) - set(_daily_keys(keys_before, yesterday))
    assert await redis_counts(pg_tracker, [("article", "old"), ("article", "new")]) == {
        ("article", "old"): 3,
        ("article", "new"): 2,
    }


async def test_cleanup_waits_while_a_batch_is_unsettled(
    pg_tracker: ViewTracker,
    pg_store: Store,
    real_redis: aioredis.Redis,
    settings: Settings,
    clock: FakeClock,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
) -> None:
    await record(pg_tracker, {("article", "old"): 2})
    yesterday = datetime.fromtimestamp(clock(), settings.zone).date().isoformat()
    clock.advance(86400)
    actor_sync.clock = clock

    async def fail(name: str) -> None:
        if name == "before_commit":
            raise RuntimeError("crashed before the commit")

    with pytest.raises(RuntimeError):  # leaves an unsettled batch
        await ViewSync(real_redis, pg_store, settings, on_step=fail, clock=clock).run()
    cleanup_view_tracking.send()
    await stub_worker.drain()
    assert len(_daily_keys(await real_redis.keys("*"), yesterday)) == 2

    sync_view_counts.send()  # recovers the batch, then cleans up
    await stub_worker.drain()
    assert _daily_keys(await real_redis.keys("*"), yesterday) == []
    assert await database_counts(pg_store, [("article", "old")]) == {("article", "old"): 2}
    assert actor_sync.reports[-1].cleaned_keys == 2


async def test_viewmw_sync_enqueue_sends_the_sync_to_the_worker(
    viewed: ViewTracker,
    pg_store: Store,
    stub_worker: StubWorker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = await asyncio.to_thread(main, ["sync", "--enqueue"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("sync queued as message ")

    await stub_worker.drain()
    await assert_synced(viewed, pg_store)


async def test_a_sync_that_loses_its_lock_fails_without_retries(
    viewed: ViewTracker,
    pg_store: Store,
    real_redis: aioredis.Redis,
    stub_worker: StubWorker,
    actor_sync: ActorSync,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = 0

    async def stall_past_the_lock(step: str) -> None:
        nonlocal attempts
        if step == "locked":
            attempts += 1
        if step == "sealed":  # stands in for a pause longer than the lock time
            client = aioredis.Redis.from_url(REDIS_URL)  # on the worker's own event loop
            try:
                await client.delete(KEYS.sync_lock)
            finally:
                await client.aclose()

    actor_sync.on_step = stall_past_the_lock
    sync_view_counts.send_with_options(min_backoff=10, max_backoff=40)
    await stub_worker.drain()

    assert attempts == 1, "a lost lock is not retried: the sync holding it does the work"
    assert FAILURES == []
    assert "lost its lock" in caplog.text
    assert await ledger_size(pg_store) == 0
    assert await redis_counts(viewed, CONTENTS) == VIEWS  # nothing lost, nothing committed

    actor_sync.on_step = None
    sync_view_counts.send()
    await stub_worker.drain()
    await assert_synced(viewed, pg_store)
    assert await ledger_size(pg_store) == 1


def test_the_actors_listen_on_the_apps_queue() -> None:
    settings = Settings.from_env({"VIEWMW_KEY_PREFIX": "app1:"})
    assert worker_settings.queue_name == QUEUE == "viewmw"  # the tests run without a prefix
    assert (settings.dramatiq_queue_name, settings.dramatiq_namespace) == (
        "viewmw-app1",
        "dramatiq-app1",
    )


async def test_a_type_the_app_counts_elsewhere_is_left_pending_and_logged_as_an_error(
    viewed: ViewTracker,
    pg_store: Store,
    real_redis: aioredis.Redis,
    stub_worker: StubWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The app runs without a table for stories; the worker's settings map them to one.
    assert await record_mapping(real_redis, KEYS, Store(pg_store.engine))

    sync_view_counts.send()
    await stub_worker.drain()

    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(m.startswith("not syncing content type 'story'") for m in errors), errors
    pending = {c: v for c, v in VIEWS.items() if c[0] == "story"}
    assert await redis_counts(viewed, list(pending)) == pending
    assert await database_counts(pg_store, list(pending)) == dict.fromkeys(pending, 0)
    assert await database_counts(pg_store, [("article", "a-1")]) == {("article", "a-1"): 2}
    assert FAILURES == []


async def test_the_sync_actor_replays_the_outbox_before_it_syncs(
    pg_tracker: ViewTracker, pg_store: Store, stub_worker: StubWorker
) -> None:
    """Views a web process kept during a Redis outage and never replayed (it is gone)."""
    outbox = Outbox(pg_store.engine)
    now = pg_tracker.clock()
    for n, viewer in enumerate(["user:7", "user:8", "user:7"]):  # a refresh by user 7
        assert await outbox.add(OutboxEvent.new("article", "a-9", viewer, now + n))

    sync_view_counts.send()
    await stub_worker.drain()

    assert await database_counts(pg_store, [("article", "a-9")]) == {("article", "a-9"): 2}
    assert await outbox.oldest(10) == []
    assert FAILURES == []
