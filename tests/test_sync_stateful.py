"""A state machine that interleaves views, syncs, crashes, recoveries, evictions and day changes.

Hypothesis drives views (under the default abuse rules), complete syncs (with and without
``force``), syncs that raise at a step or die there while their lock expires, dead syncs that
wake up again, evictions of cached database counts, reads, and the clock moving by minutes,
hours and days. After every step, every content's views are conserved; every read shows exactly
the views accepted; every complete sync leaves everything in the database once.

The machine drives async code from its own event loop, with its own Redis client on the test
database and its own database: SQLite in a temporary directory, and the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.conftest import _fresh_store
from tests.support import DATABASE_URL, REDIS_URL, FakeClock, examples
from tests.test_sync import (
    CONTENTS,
    DAY,
    KEYS,
    RAISE_POINTS,
    STEP_POINTS,
    STORY_IDS,
    TASK_IDS,
    Gate,
    Hook,
    InjectedCrash,
    World,
)
from viewmw import Settings
from viewmw.sync import SyncError, SyncReport

T = TypeVar("T")

POINTS = STEP_POINTS


class SyncMachine(RuleBasedStateMachine):
    database_url: str | None = None  # None: SQLite in a temporary directory

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = tempfile.mkdtemp(prefix="viewmw-stateful-")
        self.dead: list[tuple[Gate, asyncio.Task[Any]]] = []
        self.world = self.run(self._start())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    async def _start(self) -> World:
        redis = aioredis.Redis.from_url(REDIS_URL)
        await redis.flushdb()
        url = self.database_url or f"sqlite+aiosqlite:///{self.directory}/viewmw.sqlite3"
        store = await _fresh_store(url)
        world = World(
            redis,
            store,
            FakeClock(),
            # The machine checks what the sync moves, not how long a busy database may take: a
            # count read on a loaded machine can outlast the default deadlines.
            Settings(
                secret="test-secret-0123456789",
                database_request_timeout=30.0,
                database_timeout=30.0,
            ),
        )
        await world.seed()
        return world

    def teardown(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _stop(self) -> None:
        for _, task in self.dead:
            task.cancel()
        await asyncio.gather(*(task for _, task in self.dead), return_exceptions=True)
        await self.world.bury()
        await self.world.redis.aclose()
        await self.world.store.close()

    # Traffic and time -----------------------------------------------------------------------------

    @rule(content=st.sampled_from(CONTENTS), viewer=st.integers(0, 3))
    def view(self, content: tuple[str, str], viewer: int) -> None:
        result = self.run(self.world.view(content, f"user:{viewer}"))
        assert result.count is not None
        assert result.count.total == self.world.accepted[content]

    @rule(seconds=st.sampled_from([60, 301, 3600, 6 * 3600]))
    def time_passes(self, seconds: int) -> None:
        self.world.clock.advance(seconds)

    @rule()
    def day_changes(self) -> None:
        self.world.clock.advance(DAY)

    # Syncs ----------------------------------------------------------------------------------------

    @rule(force=st.booleans())
    def sync(self, force: bool) -> None:
        world = self.world
        report = self.run(world.sync().run(force=force))
        assert not report.already_running
        self.run(world.check_settled())
        if force:
            today = world.day()
            keys = self.run(world.daily_keys("*"))
            assert all(key.rsplit(":", 1)[-1] >= today for key in keys), keys

    @rule(point=st.sampled_from(RAISE_POINTS))
    def sync_raises(self, point: tuple[str, int]) -> None:
        hook = Hook()
        hook.crash_at(*point)
        try:
            self.run(self.world.sync(on_step=hook).run())
        except InjectedCrash:
            assert hook.seen[point[0]] == point[1]

    @rule(point=st.sampled_from(POINTS))
    def sync_dies(self, point: tuple[str, int]) -> None:
        self.run(self._sync_dies(point))

    async def _sync_dies(self, point: tuple[str, int]) -> None:
        hook = Hook()
        gate = hook.park_at(*point)
        task = self.world.start(self.world.sync(on_step=hook).run())  # on the machine's loop
        if await gate.reached_by(task):
            await self.world.redis.delete(KEYS.sync_lock)  # its lock expires
            self.dead.append((gate, task))
        else:
            assert isinstance(task.result(), SyncReport)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def dead_sync_wakes_up(self, data: st.DataObject) -> None:
        gate, task = self.dead.pop(data.draw(st.integers(0, len(self.dead) - 1)))
        gate.open()
        outcome = self.run(asyncio.gather(task, return_exceptions=True))[0]
        assert isinstance(outcome, SyncReport | SyncError), repr(outcome)

    # The cache and reads --------------------------------------------------------------------------

    @rule(content=st.sampled_from(CONTENTS))
    def cache_evicted(self, content: tuple[str, str]) -> None:
        self.run(self.world.redis.delete(KEYS.database_count(*content)))

    @rule(content_type=st.sampled_from(["story", "task"]))
    def read(self, content_type: str) -> None:
        ids = STORY_IDS if content_type == "story" else TASK_IDS
        counts = self.run(self.world.tracker.get_view_count_details(content_type, ids))
        for content_id, count in counts.items():
            assert count is not None, content_id
            assert count.total == self.world.accepted[(content_type, content_id)], content_id

    @invariant()
    def views_are_conserved(self) -> None:
        self.run(self.world.check_conservation())


class PostgresSyncMachine(SyncMachine):
    database_url = DATABASE_URL


MACHINE_SETTINGS = settings(
    max_examples=examples(20),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Hundreds of syncs, views and faults per run: on a loaded machine more than the usual limit.
MACHINE_TIMEOUT = pytest.mark.timeout(400)

TestSyncOnSQLite = SyncMachine.TestCase
TestSyncOnSQLite.settings = MACHINE_SETTINGS
TestSyncOnSQLite.pytestmark = [MACHINE_TIMEOUT]
TestSyncOnPostgreSQL = PostgresSyncMachine.TestCase
TestSyncOnPostgreSQL.settings = MACHINE_SETTINGS
TestSyncOnPostgreSQL.pytestmark = [MACHINE_TIMEOUT]
