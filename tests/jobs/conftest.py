"""The worker's environment, set before anything imports :mod:`viewmw.jobs`, and in-process
fixtures.

Importing ``viewmw.jobs`` reads ``VIEWMW_*`` once (broker, schedule, retries, failure hook). This
module sets them to the test servers and a stub broker, imports ``viewmw.jobs``, then puts
``os.environ`` back as it was, so no other test sees the worker's variables.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support import DATABASE_URL, REDIS_URL, FakeClock

if "viewmw.jobs" in sys.modules:  # pragma: no cover - a guard for future test modules
    raise RuntimeError(
        "viewmw.jobs was imported before tests/jobs/conftest.py set the worker's environment: "
        "import viewmw.jobs only from tests under tests/jobs/"
    )

WORKER_ENV = {
    "VIEWMW_BROKER_URL": "stub://",
    "VIEWMW_REDIS_URL": REDIS_URL,
    "VIEWMW_DATABASE_URL": DATABASE_URL,
    "VIEWMW_TIMEZONE": "Europe/Paris",
    "VIEWMW_CONTENT_TABLES": "story=stories.view_count,fantasy=fantasies.view_count",
    "VIEWMW_RETRY_MIN_BACKOFF_MS": "10",
    "VIEWMW_SYNC_TIME_LIMIT_MS": "120000",
    "VIEWMW_FAILURE_HOOK": "tests.jobs.test_actors:record_failure",
}


def _import_jobs() -> None:
    saved = {name: value for name, value in os.environ.items() if name.startswith("VIEWMW_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(WORKER_ENV)
    try:
        import viewmw.jobs  # noqa: F401
    finally:
        for name in WORKER_ENV:
            os.environ.pop(name, None)
        os.environ.update(saved)


_import_jobs()

import dramatiq  # noqa: E402
from dramatiq.brokers.stub import StubBroker  # noqa: E402

import viewmw.jobs.actors  # noqa: E402
from tests.jobs import QUEUE  # noqa: E402
from viewmw import Settings, Store, ViewTracker  # noqa: E402
from viewmw.jobs import broker  # noqa: E402
from viewmw.jobs.broker import settings as job_settings  # noqa: E402
from viewmw.sync import StepHook, SyncReport, ViewSync  # noqa: E402

assert isinstance(broker, StubBroker), "VIEWMW_BROKER_URL=stub:// gives the stub broker"
stub_broker: StubBroker = broker

# What `dramatiq` does in each worker process before its threads start: among others, the
# TimeLimit middleware starts the thread that enforces time limits here.
broker.emit_after("process_boot")


@pytest.fixture
def settings() -> Settings:
    """The settings the actors run with (overrides the top-level fixture of the same name)."""
    return job_settings


@dataclass
class StubWorker:
    """A Dramatiq worker on the stub broker, in this process."""

    worker: dramatiq.Worker

    async def drain(self) -> None:
        """Wait until every message on the queue (retries, failure notices) is processed."""
        await asyncio.to_thread(
            functools.partial(stub_broker.join, QUEUE, fail_fast=False, timeout=60_000)
        )
        await asyncio.to_thread(self.worker.join)


@pytest.fixture
def stub_worker() -> Iterator[StubWorker]:
    """A started worker with two threads; the stub broker's queues are empty at the start."""
    broker.flush_all()
    worker = dramatiq.Worker(broker, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        yield StubWorker(worker)
    finally:
        worker.stop()
        broker.flush_all()
        # Each Worker adds a middleware of its own to the broker; the broker outlives it here.
        broker.middleware[:] = [
            m for m in broker.middleware if getattr(m, "worker", None) is not worker
        ]


@dataclass
class ActorSync:
    """What the actors' :class:`ViewSync` is built with, and what each run reported."""

    clock: Callable[[], float] = time.time
    on_step: StepHook | None = None
    reports: list[SyncReport] = field(default_factory=list)
    on_report: Callable[[SyncReport], None] | None = None


@pytest.fixture
def actor_sync(monkeypatch: pytest.MonkeyPatch) -> ActorSync:
    """Inject a clock and a step hook into the actors' syncs, and record what they report."""
    control = ActorSync()

    class RecordingSync(ViewSync):
        async def run(self, **options: Any) -> SyncReport:
            report = await super().run(**options)
            control.reports.append(report)
            if control.on_report is not None:
                control.on_report(report)
            return report

    def build(redis: aioredis.Redis, store: Store, settings: Settings) -> ViewSync:
        return RecordingSync(redis, store, settings, clock=control.clock, on_step=control.on_step)

    monkeypatch.setattr(viewmw.jobs.actors, "ViewSync", build)
    return control


@pytest.fixture
async def pg_tracker(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, clock: FakeClock
) -> AsyncIterator[ViewTracker]:
    """A tracker on the real Redis and PostgreSQL, configured like the worker."""
    yield ViewTracker(real_redis, pg_store, settings, clock=clock)
