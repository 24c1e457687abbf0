"""The guarded sync: what it moves, what it reports, cleanup, concurrency and the displayed count.

Every test runs on the real Redis with PostgreSQL and with SQLite, and most again on fakeredis.
Views go to two kinds of content: ``story`` (a mapped table whose rows the tests insert) and
``task`` (the generic table, upserted).

The harness here (:class:`World`, :class:`Hook`, :class:`Gate`) is shared with
``test_sync_faults.py`` and ``test_sync_stateful.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from tests.conftest import stories
from tests.support import FakeClock
from viewmw import InvalidKeyError, KeySchema, Limits, Settings, Store, TrackResult, ViewTracker
from viewmw.sync import SyncError, SyncReport, ViewSync, _Ahead

DAY = 86400
KEYS = KeySchema()
# Step boundaries a test can stop a sync at: (step, its n-th occurrence); chunks of 3 make the
# second snapshot and settle fall mid-way.
STEP_POINTS = [
    ("locked", 1),
    ("snapshot", 1),
    ("snapshot", 2),
    ("sealed", 1),
    ("before_commit", 1),
    ("committed", 1),
    ("settle", 1),
    ("settle", 2),
    ("cleanup", 1),
]
# With "history", inside the database transaction (the batch's history rows are made while it
# runs): a sync may raise there, but is not stopped there for good (tests/test_sync_faults.py
# says why).
RAISE_POINTS = [*STEP_POINTS, ("history", 1)]
STORY_IDS = ["1", "2", "3", "4", "5"]
TASK_IDS = ["t1", "t2", "t3", "t4", "t5"]
# Ten contents of two kinds, interleaved so that every chunk of three mixes them.
CONTENTS: list[tuple[str, str]] = [
    pair
    for story, task in zip(STORY_IDS, TASK_IDS, strict=True)
    for pair in (("story", story), ("task", task))
]
CHUNK = 3  # contents per snapshot/settle call: ten contents make four calls of each
# Every rule off except a generous daily limit (which keeps daily_views keys, for cleanup).
PERMISSIVE = Limits(
    max_views_per_session=None,
    max_daily_views_per_user=100_000,
    one_view_per_day=False,
    view_cooldown_seconds=None,
)


def text_of(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


# Step hooks ---------------------------------------------------------------------------------------


class InjectedCrash(Exception):
    """Raised by a hook to stand in for an exception at a step boundary."""


@dataclass
class Gate:
    """A step boundary where a sync parks: a process that stops there (until opened, if ever)."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def reached_by(self, task: asyncio.Task[Any]) -> bool:
        """Wait until ``task`` parks here (True) or finishes without reaching it (False)."""
        waiter = asyncio.ensure_future(self.reached.wait())
        # Only a guard against a test that hangs; nothing here depends on timing.
        done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when="FIRST_COMPLETED")
        assert done, "the sync neither reached the step nor finished"
        if self.reached.is_set():
            return True
        waiter.cancel()
        return False

    async def must_be_reached_by(self, task: asyncio.Task[Any]) -> None:
        if not await self.reached_by(task):
            task.result()  # re-raises what the sync raised
            raise AssertionError("the sync finished without reaching the step")

    def open(self) -> None:
        self.opened.set()


class Hook:
    """An ``on_step`` hook: records the steps, and crashes, parks or calls back at chosen ones.

    A point is ``(step, nth)``: the nth time the sync reaches that step.
    """

    def __init__(self, *, yields: int = 0) -> None:
        self.steps: list[str] = []
        self.seen: Counter[str] = Counter()
        self.yields = yields
        self._crash: set[tuple[str, int]] = set()
        self._gates: dict[tuple[str, int], Gate] = {}
        self._calls: dict[str, list[Callable[[], Awaitable[None]]]] = {}

    def crash_at(self, step: str, nth: int = 1) -> None:
        self._crash.add((step, nth))

    def park_at(self, step: str, nth: int = 1) -> Gate:
        return self._gates.setdefault((step, nth), Gate())

    def call_at(self, step: str, callback: Callable[[], Awaitable[None]]) -> None:
        self._calls.setdefault(step, []).append(callback)

    async def __call__(self, step: str) -> None:
        self.steps.append(step)
        self.seen[step] += 1
        point = (step, self.seen[step])
        for callback in self._calls.get(step, []):
            await callback()
        for _ in range(self.yields):
            await asyncio.sleep(0)
        if point in self._crash:
            raise InjectedCrash(f"injected at {step} #{point[1]}")
        gate = self._gates.get(point)
        if gate is not None:
            gate.reached.set()
            await gate.opened.wait()


# The world: Redis, a database, a clock, a tracker and what was accepted ---------------------------


class World:
    """Everything a sync test needs, and the checks of the invariants."""

    def __init__(
        self,
        redis: aioredis.Redis,
        store: Store,
        clock: FakeClock,
        settings: Settings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.clock = clock
        self.settings = settings
        # On a Redis Cluster (a redis+cluster:// URL in the settings) each content's keys are in
        # its shard, and each shard has its own batch; on a single Redis there is one shard.
        self.shards = settings.content_shards()
        self.keys = self.shards.schemas[0]
        self.tracker = ViewTracker(redis, store, settings, clock=clock)
        self.accepted: Counter[tuple[str, str]] = Counter()
        self.tasks: list[asyncio.Task[Any]] = []

    def permissive(self) -> World:
        """Switch every abuse rule off (but the daily limit), so every view counts."""
        self.settings = self.settings.replace(limits=PERMISSIVE)
        self.tracker = ViewTracker(self.redis, self.store, self.settings, clock=self.clock)
        return self

    def sync(self, **options: Any) -> ViewSync:
        options.setdefault("chunk_contents", CHUNK)
        return ViewSync(self.redis, self.store, self.settings, clock=self.clock, **options)

    def start(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self.tasks.append(task)
        return task

    async def bury(self) -> None:
        """Cancel every sync still parked (a dead process never comes back)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    async def seed(self) -> None:
        """Insert the story rows (a mapped table drops deltas of rows that do not exist)."""
        async with self.store.engine.begin() as connection:
            await connection.execute(
                stories.insert(), [{"id": int(i), "view_count": 0} for i in STORY_IDS]
            )

    # Traffic ------------------------------------------------------------------------------------

    async def view(self, content: tuple[str, str], viewer: str) -> TrackResult:
        result = await self.tracker.track_view(content[0], content[1], viewer)
        if result.counted:
            self.accepted[content] += 1
        return result

    async def traffic(
        self, viewers: Iterable[int], contents: Iterable[tuple[str, str]] = CONTENTS
    ) -> int:
        """Every viewer views every content once; returns how many were counted."""
        counted = 0
        contents = list(contents)
        for viewer in viewers:
            for content in contents:
                counted += (await self.view(content, f"user:{viewer}")).counted
        return counted

    def day(self) -> str:
        return datetime.fromtimestamp(self.clock(), UTC).date().isoformat()

    async def daily_keys(self, day: str) -> list[str]:
        pattern = f"{KEYS.prefix}daily_views:*:{day}"
        return sorted([text_of(k) async for k in self.redis.scan_iter(match=pattern)])

    # Reading the state --------------------------------------------------------------------------

    def contents(self) -> list[tuple[str, str]]:
        return sorted(set(CONTENTS) | set(self.accepted))

    async def parts(self, content: tuple[str, str]) -> tuple[int, int, int | None]:
        """Pending, syncing and the cached database count (``None`` when not cached)."""
        keys = self.shards.of(*content)  # the three are in one slot, even on a cluster
        pending, syncing, cached = await self.redis.mget(
            keys.pending(*content), keys.syncing(*content), keys.database_count(*content)
        )
        return int(pending or 0), int(syncing or 0), None if cached is None else int(cached)

    async def db_counts(self) -> dict[tuple[str, str], int]:
        return {
            content: await self.tracker.get_database_view_count(*content)
            for content in self.contents()
        }

    async def batch(self, keys: KeySchema | None = None) -> tuple[str, dict[str, int]]:
        """The unsettled batch's id ("" if none) and its items (of one shard's keys; on a
        single Redis, the one batch)."""
        keys = keys or self.keys
        batch_id = text_of(await self.redis.hget(keys.sync_batch, "id"))
        items = await self.redis.hgetall(keys.sync_batch_items(batch_id)) if batch_id else {}
        return batch_id, {text_of(k): int(v) for k, v in items.items()}

    async def redis_state(self) -> dict[str, Any]:
        """Everything Redis holds about counts that a sync may move."""
        batches = [await self.batch(keys) for keys in self.shards.schemas]
        return {
            "batches": [batch for batch in batches if batch[0] or batch[1]],
            "parts": {content: (await self.parts(content))[:2] for content in self.contents()},
        }

    async def ledger(self) -> list[dict[str, Any]]:
        return await self.store.last_batches(100_000)

    # The invariants -----------------------------------------------------------------------------

    async def check_conservation(self) -> None:
        """For every content: database + pending + syncing = views accepted.

        Between commit and settle, the unsettled batch is already in the database and Redis still
        shows it as syncing; the ledger says which: syncing counts only while its batch is not in
        the ledger. Whenever the database count is cached in Redis, the cache holds the database
        count as of the last settle, so cache + pending + syncing = accepted at every instant.
        """
        members = {KEYS.member(*content) for content in self.contents()}
        batches: dict[int, tuple[str, dict[str, int], bool]] = {}
        for shard, keys in enumerate(self.shards.schemas):
            batch_id, items = await self.batch(keys)
            assert batch_id or not items, "batch items without a batch"
            assert set(items) <= members, f"batch items of unknown contents: {set(items) - members}"
            committed = bool(batch_id) and await self.store.is_committed(batch_id)
            batches[shard] = (batch_id, items, committed)
        for content in self.contents():
            batch_id, items, committed = batches[self.shards.index(*content)]
            database = await self.tracker.get_database_view_count(*content)
            pending, syncing, cached = await self.parts(content)
            assert syncing == items.get(KEYS.member(*content), 0), (content, syncing, items)
            outside_database = pending + (0 if committed else syncing)
            assert database + outside_database == self.accepted[content], (
                f"{content}: database {database} + pending {pending} + syncing {syncing} "
                f"(batch {batch_id or '-'} {'committed' if committed else 'not committed'}) "
                f"!= accepted {self.accepted[content]}"
            )
            if cached is not None:
                assert cached + pending + syncing == self.accepted[content], (
                    f"{content}: cached {cached} + pending {pending} + syncing {syncing} "
                    f"!= accepted {self.accepted[content]}"
                )

    async def check_settled(self) -> None:
        """After a complete sync: everything is in the database, once."""
        await self.check_conservation()
        for keys in self.shards.schemas:
            assert not await self.redis.exists(keys.sync_batch), "a sync batch was left behind"
            assert await self.redis.scard(keys.dirty) == 0
        leftover = [key async for key in self.redis.scan_iter(match=KEYS.sync_batch_items("*"))]
        assert not leftover, f"batch items were left behind: {leftover}"
        for content in self.contents():
            database = await self.tracker.get_database_view_count(*content)
            pending, syncing, cached = await self.parts(content)
            assert (database, pending, syncing) == (self.accepted[content], 0, 0), content
            assert cached in (None, database), content
        ledger = await self.ledger()
        ids = [row["batch_id"] for row in ledger]
        assert len(ids) == len(set(ids))
        assert sum(row["views"] for row in ledger) == sum(self.accepted.values()), (
            "the ledger's batches do not add up to the views accepted"
        )


@pytest.fixture(params=["redis-postgresql", "redis-sqlite", "fakeredis-sqlite"])
def backends(request: pytest.FixtureRequest) -> tuple[aioredis.Redis, Store]:
    """Real Redis with PostgreSQL and with SQLite, and fakeredis with SQLite."""
    redis_name, database = request.param.split("-")
    redis = request.getfixturevalue("real_redis" if redis_name == "redis" else "fake_redis")
    store = request.getfixturevalue("pg_store" if database == "postgresql" else "sqlite_store")
    return redis, store


@pytest.fixture
async def world(
    backends: tuple[aioredis.Redis, Store], settings: Settings, clock: FakeClock
) -> AsyncIterator[World]:
    world = World(*backends, clock, settings)
    yield world
    await world.bury()


@pytest.fixture(
    params=["redis-postgresql", "redis-sqlite", "fakeredis-sqlite", "cluster-postgresql"]
)
def any_backends(request: pytest.FixtureRequest) -> tuple[aioredis.Redis, Store, str | None]:
    """:func:`backends`, and a real local Redis Cluster with PostgreSQL; with the cluster's URL
    (``None`` for a single Redis), which the settings need to shard the keys."""
    redis_name, database = request.param.split("-")
    store = request.getfixturevalue("pg_store" if database == "postgresql" else "sqlite_store")
    if redis_name == "cluster":
        url = request.getfixturevalue("redis_cluster").url
        return request.getfixturevalue("cluster_redis"), store, url
    redis = request.getfixturevalue("real_redis" if redis_name == "redis" else "fake_redis")
    return redis, store, None


@pytest.fixture
async def any_world(
    any_backends: tuple[aioredis.Redis, Store, str | None], settings: Settings, clock: FakeClock
) -> AsyncIterator[World]:
    """A :class:`World` on every backend of :func:`any_backends`."""
    redis, store, cluster_url = any_backends
    if cluster_url is not None:
        settings = settings.replace(redis_url=cluster_url)
    world = World(redis, store, clock, settings)
    yield world
    await world.bury()


@pytest.fixture
async def real_world(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> AsyncIterator[World]:
    """Real Redis with PostgreSQL and with SQLite (conftest's ``store``)."""
    world = World(real_redis, store, clock, settings)
    yield world
    await world.bury()


async def settled_world(world: World, viewers: int = 2) -> int:
    """Seed, make traffic, sync it all; returns the views synced."""
    await world.seed()
    views = await world.traffic(range(viewers))
    await world.sync().run()
    return views


# What a sync moves and reports --------------------------------------------------------------------


async def test_a_sync_moves_every_pending_view_into_the_database_once(world: World) -> None:
    await world.seed()
    counted = await world.traffic(range(3))
    blocked = await world.view(CONTENTS[0], "user:0")  # one view per day: not counted
    assert not blocked.counted and counted == 30

    report = await world.sync().run()

    assert report.already_running is False
    assert (report.batches, report.recovered_batches) == (1, 0)
    assert (report.contents, report.views) == (10, 30)
    assert report.duration >= 0
    assert len(report.batch_ids) == 1
    ledger = await world.ledger()
    assert [(row["batch_id"], row["contents"], row["views"]) for row in ledger] == [
        (report.batch_ids[0], 10, 30)
    ]
    await world.check_settled()
    assert await world.tracker.get_view_counts("story", STORY_IDS) == dict.fromkeys(STORY_IDS, 3)
    assert await world.tracker.get_view_counts("task", TASK_IDS) == dict.fromkeys(TASK_IDS, 3)


async def test_a_second_sync_adds_only_the_new_views(world: World) -> None:
    await settled_world(world, viewers=2)
    world.clock.advance(DAY)
    await world.traffic(range(3), CONTENTS[:4])

    report = await world.sync().run()

    assert (report.batches, report.contents, report.views) == (1, 4, 12)
    await world.check_settled()
    assert await world.tracker.get_database_view_count("story", "1") == 5
    assert await world.tracker.get_database_view_count("story", "5") == 2


async def test_small_batches_split_the_run_and_the_report_adds_them_up(world: World) -> None:
    await world.seed()
    await world.traffic(range(2))
    steps = Hook()

    report = await world.sync(batch_contents=4, on_step=steps).run()

    assert (report.batches, report.contents, report.views) == (3, 10, 20)
    assert len(set(report.batch_ids)) == 3
    ledger = await world.ledger()
    assert sorted(row["contents"] for row in ledger) == [2, 4, 4]
    assert {row["batch_id"] for row in ledger} == set(report.batch_ids)
    assert steps.seen["before_commit"] == steps.seen["committed"] == 3
    await world.check_settled()


async def test_without_pending_views_a_sync_returns_early_and_creates_nothing(
    world: World,
) -> None:
    steps = Hook()

    report = await world.sync(on_step=steps).run()

    assert report == SyncReport(duration=report.duration)
    assert report.duration >= 0
    assert steps.steps == ["locked"]
    assert not await world.redis.exists(KEYS.sync_batch, KEYS.sync_lock)
    assert await world.ledger() == []


async def test_the_lock_is_released_after_every_outcome(world: World) -> None:
    await world.seed()
    await world.traffic(range(1))
    await world.sync().run()
    assert not await world.redis.exists(KEYS.sync_lock)
    crashing = Hook()
    crashing.crash_at("snapshot")
    await world.traffic(range(1, 2))
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=crashing).run()
    assert not await world.redis.exists(KEYS.sync_lock)
    assert (await world.sync().run()).recovered_batches == 0  # the batch was empty
    await world.check_settled()


async def test_the_run_ends_even_if_a_client_swallows_its_renewals_cancellation(
    real_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = real_world
    in_flight = asyncio.Event()
    hook = Hook()
    hook.call_at("locked", in_flight.wait)  # the run ends while a renewal is under way
    # Renewed after 1 s; the lock itself lasts 3 s, so the run ends long before it expires.
    sync = world.sync(lock_seconds=3.0, on_step=hook)
    evalsha = world.redis.evalsha
    swallowed: list[int] = []

    async def swallowing(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha != sync.scripts.renew_lock.sha:
            return await evalsha(sha, numkeys, *keys_and_args)
        in_flight.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # as redis-py's cluster client may, while a node dies
            swallowed.append(1)
        return 1

    monkeypatch.setattr(world.redis, "evalsha", swallowing)
    async with asyncio.timeout(30):  # only a guard: the run must end, not hang
        report = await sync.run()
    assert swallowed == [1]
    assert not report.already_running and report.views == 0
    assert not await world.redis.exists(KEYS.sync_lock)


async def test_a_recovered_batch_is_reported(world: World) -> None:
    """A batch left before its commit is committed by the next run; one left after, settled."""
    await world.seed()
    await world.traffic(range(2))
    before_commit = Hook()
    before_commit.crash_at("before_commit")
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=before_commit).run()
    await world.traffic(range(2, 3), CONTENTS[:2])

    report = await world.sync().run()

    # The recovered batch (20 views) and a new one (the 2 that came after the crash).
    assert (report.recovered_batches, report.batches) == (1, 2)
    assert (report.contents, report.views) == (12, 22)
    await world.check_settled()

    world.clock.advance(DAY)
    await world.traffic(range(1))
    after_commit = Hook()
    after_commit.crash_at("committed")
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=after_commit).run()

    report = await world.sync().run()

    # Committed by the crashed run: this one only settles it, so it adds no views.
    assert (report.recovered_batches, report.batches, report.views) == (1, 0, 0)
    await world.check_settled()


async def test_rows_made_ahead_arrive_in_order_then_the_failure_then_nothing() -> None:
    async def rows() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise InjectedCrash("the third row")

    ahead = _Ahead(rows())
    received = []
    with pytest.raises(InjectedCrash):
        async for row in ahead:
            received.append(row)
    assert received == [1, 2]
    with pytest.raises(InjectedCrash):  # asked again, the end stays the end
        await anext(ahead)
    await ahead.aclose()


async def test_closing_rows_made_ahead_stops_the_task_that_makes_them() -> None:
    stopped = asyncio.Event()

    async def rows() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # a read that never answers
            yield 2
        finally:
            stopped.set()

    ahead = _Ahead(rows())
    assert await anext(ahead) == 1
    await ahead.aclose()
    assert stopped.is_set()


async def test_a_failure_making_the_history_rows_rolls_the_added_totals_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history rows are made while the transaction adds the totals: a failure to make them
    reaches the transaction after the totals went in, and takes them out again."""
    await world.seed()
    await world.traffic(range(2))
    database = await world.db_counts()
    totals_added: list[str] = []
    add_totals = world.store._commit

    async def recording(*args: Any, **kwargs: Any) -> Any:
        unmatched = await add_totals(*args, **kwargs)
        totals_added.append(args[1])  # the batch id
        return unmatched

    monkeypatch.setattr(world.store, "_commit", recording)
    crashing = Hook()
    crashing.crash_at("history")
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=crashing).run()

    assert len(totals_added) == 1
    assert await world.db_counts() == database
    assert await world.ledger() == []
    await world.check_conservation()
    report = await world.sync().run()
    assert (report.recovered_batches, report.batches, report.views) == (1, 1, 20)
    await world.check_settled()


# Cleanup ------------------------------------------------------------------------------------------


async def yesterday_and_today(world: World) -> tuple[list[str], list[str]]:
    """Views yesterday and today; returns yesterday's and today's daily_views keys."""
    await world.seed()
    await world.traffic(range(3))
    yesterday = world.day()
    world.clock.advance(DAY)
    await world.traffic(range(1, 3), CONTENTS[:2])
    stale, fresh = await world.daily_keys(yesterday), await world.daily_keys(world.day())
    assert len(stale) == 3 and len(fresh) == 2
    return stale, fresh


async def test_cleanup_deletes_yesterdays_daily_keys_only_after_the_commit(world: World) -> None:
    stale, fresh = await yesterday_and_today(world)
    stale_day = stale[0].rsplit(":", 1)[-1]
    observed: dict[str, Any] = {}
    steps = Hook()

    def observe(step: str) -> Callable[[], Awaitable[None]]:
        async def look() -> None:
            batch_id, _ = await world.batch()
            stale_left = len(await world.daily_keys(stale_day))
            observed[step] = (stale_left, len(await world.ledger()), batch_id)

        return look

    for step in ("before_commit", "committed", "settle", "cleanup"):
        steps.call_at(step, observe(step))

    report = await world.sync(on_step=steps).run()

    assert report.cleaned_keys == 3
    assert await world.daily_keys(stale_day) == []
    assert await world.daily_keys(world.day()) == fresh
    # Until the batch was committed and settled, every stale key was still there.
    assert observed["before_commit"][:2] == (3, 0)
    assert observed["committed"][:2] == (3, 1)
    assert observed["settle"][:2] == (3, 1)
    assert observed["cleanup"] == (3, 1, "")  # the batch is gone before cleanup begins
    await world.check_settled()


async def test_no_cleanup_while_a_batch_is_unsettled(world: World) -> None:
    stale, fresh = await yesterday_and_today(world)
    stale_day = stale[0].rsplit(":", 1)[-1]
    crashing = Hook()
    crashing.crash_at("settle", 2)
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=crashing).run()
    assert (await world.batch())[0]

    assert await world.sync().cleanup() == 0
    assert await world.daily_keys(stale_day) == stale

    report = await world.sync().run()
    assert report.recovered_batches == 1
    assert report.cleaned_keys == 3
    assert await world.daily_keys(stale_day) == []
    assert await world.daily_keys(world.day()) == fresh
    await world.check_settled()


async def test_force_cleans_up_with_nothing_pending(world: World) -> None:
    await world.seed()
    await world.traffic(range(3))
    yesterday = world.day()
    await world.sync().run()
    world.clock.advance(DAY)
    stale = await world.daily_keys(yesterday)
    assert len(stale) == 3

    lazy = await world.sync().run()
    assert lazy.cleaned_keys == 0 and lazy.batches == 0
    assert await world.daily_keys(yesterday) == stale

    forced = await world.sync().run(force=True)
    assert forced.cleaned_keys == 3
    assert (forced.batches, forced.contents, forced.views) == (0, 0, 0)
    assert await world.daily_keys(yesterday) == []
    assert not await world.redis.exists(KEYS.sync_batch)
    await world.check_settled()


# Concurrency --------------------------------------------------------------------------------------


async def test_two_syncs_started_at_once_one_does_the_work(world: World) -> None:
    await world.seed()
    await world.traffic(range(2))
    loser_returned = asyncio.Event()

    async def hold_the_lock(step: str) -> None:
        if step == "locked":  # the winner waits until the loser has given up
            await loser_returned.wait()

    async def run(sync: ViewSync) -> SyncReport:
        report = await sync.run()
        if report.already_running:
            loser_returned.set()
        return report

    first, second = await asyncio.gather(
        run(world.sync(on_step=hold_the_lock)), run(world.sync(on_step=hold_the_lock))
    )

    winner, loser = (first, second) if second.already_running else (second, first)
    assert (winner.already_running, loser.already_running) == (False, True)
    assert (winner.batches, winner.views) == (1, 20)
    assert loser == SyncReport(already_running=True)
    await world.check_settled()


async def test_views_keep_arriving_while_syncs_run(world: World) -> None:
    world.permissive()
    await world.seed()
    rng = random.Random(20261123)
    reports: list[SyncReport] = []
    traffic_done = asyncio.Event()

    async def viewer(n: int) -> None:
        for _ in range(30):
            await world.view(rng.choice(CONTENTS), f"user:{n}")

    async def interleaving(step: str) -> None:
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)

    async def syncs() -> None:
        while not traffic_done.is_set():
            pair = await asyncio.gather(
                world.sync(on_step=interleaving).run(), world.sync(on_step=interleaving).run()
            )
            assert not all(report.already_running for report in pair)
            reports.extend(pair)
            await asyncio.sleep(0)

    async def traffic() -> None:
        await asyncio.gather(*(viewer(n) for n in range(12)))
        traffic_done.set()

    await asyncio.gather(traffic(), syncs())
    reports.append(await world.sync().run())

    assert sum(world.accepted.values()) == 12 * 30
    await world.check_settled()
    assert len(reports) >= 3
    assert sum(report.views for report in reports) == 12 * 30
    ledger_ids = {row["batch_id"] for row in await world.ledger()}
    assert ledger_ids == {batch_id for report in reports for batch_id in report.batch_ids}


async def test_a_sync_whose_lock_expired_cannot_take_a_running_syncs_batch(world: World) -> None:
    """A stalled sync wakes up while the sync that took over is still filling its batch.

    The stalled one (P) took the lock, then stalled past its expiry; another sync (B) took the lock
    and began its batch. P wakes up and "recovers" B's batch: it reads the items moved so far and,
    before it commits them, B moves the rest of its contents into the same batch and commits.
    Whatever the order, no view may be lost or counted twice.
    """
    await world.seed()
    await world.traffic(range(2))

    stalled_hook = Hook()
    stalled_at_start = stalled_hook.park_at("locked")
    stalled_before_commit = stalled_hook.park_at("before_commit")
    stalled = world.start(world.sync(on_step=stalled_hook).run())
    await stalled_at_start.must_be_reached_by(stalled)
    await world.redis.delete(KEYS.sync_lock)  # P's lock expires

    running_hook = Hook()
    mid_snapshot = running_hook.park_at("snapshot", 2)
    running_before_commit = running_hook.park_at("before_commit")
    running = world.start(world.sync(on_step=running_hook).run())
    await mid_snapshot.must_be_reached_by(running)  # B has moved its first chunk

    stalled_at_start.open()  # P wakes up and reads B's batch as it is now
    await stalled_before_commit.reached_by(stalled)
    mid_snapshot.open()  # B moves the rest of its contents into the same batch
    await running_before_commit.reached_by(running)
    stalled_before_commit.open()  # P commits what it read
    stalled_outcome = (await asyncio.gather(stalled, return_exceptions=True))[0]
    running_before_commit.open()  # B commits the whole batch
    running_outcome = (await asyncio.gather(running, return_exceptions=True))[0]
    for outcome in (stalled_outcome, running_outcome):
        assert isinstance(outcome, SyncReport | SyncError), repr(outcome)

    await world.check_conservation()
    await world.sync().run()
    await world.check_settled()


# The displayed count ------------------------------------------------------------------------------


async def test_displayed_count_is_exact_through_syncs_crashes_and_evictions(
    world: World,
) -> None:
    """Never more than the views accepted, never less than before, whatever the sync is doing.

    Viewers, a reader that also evicts cached database counts, and a series of syncs (some
    complete, some raise at a step, some die there and lose their lock) run interleaved; the sync
    hook yields to the others at every step.
    """
    world.permissive()
    await world.seed()
    rng = random.Random(1123)
    in_flight: Counter[tuple[str, str]] = Counter()
    syncs_done = asyncio.Event()
    traffic_done = asyncio.Event()
    shown: dict[tuple[str, str], int] = {}
    seen = Counter[str]()

    async def viewer(n: int) -> None:
        views = 0
        while views < 10 or not syncs_done.is_set():
            views += 1
            content = rng.choice(CONTENTS)
            floor = world.accepted[content]
            in_flight[content] += 1
            try:
                result = await world.view(content, f"user:{n}")
            finally:
                in_flight[content] -= 1
            if result.count is not None:
                assert floor < result.count.total <= world.accepted[content] + in_flight[content]

    async def reader() -> None:
        while not traffic_done.is_set():
            content_type = rng.choice(["story", "task"])
            ids = STORY_IDS if content_type == "story" else TASK_IDS
            if rng.random() < 0.4:
                evicted = rng.choice(ids)
                await world.redis.delete(KEYS.database_count(content_type, evicted))
            floors = {i: world.accepted[(content_type, i)] for i in ids}
            details = await world.tracker.get_view_count_details(content_type, ids)
            for content_id, count in details.items():
                content = (content_type, content_id)
                if count is None:  # a sync moved views during the database read: not cached
                    seen["refused fills"] += 1
                    continue
                seen["reads"] += 1
                ceiling = world.accepted[content] + in_flight[content]
                assert floors[content_id] <= count.total <= ceiling, (content, count)
                assert count.total >= shown.get(content, 0), (content, count, shown[content])
                shown[content] = count.total
            await asyncio.sleep(0)

    async def syncs() -> None:
        points = [point for point in STEP_POINTS if point[0] != "cleanup"]
        for round_ in range(15):
            hook = Hook(yields=rng.randint(1, 4))
            step, nth = points[round_ % len(points)]
            sync = world.sync(on_step=hook)
            fate = ("complete", "exception", "death")[round_ % 3]
            if fate == "complete":
                await sync.run()
            elif fate == "exception":
                hook.crash_at(step, nth)
                with contextlib.suppress(InjectedCrash):
                    await sync.run()
                seen["crashes"] += hook.seen[step] >= nth
            else:
                gate = hook.park_at(step, nth)
                dying = world.start(sync.run())
                if await gate.reached_by(dying):
                    await world.redis.delete(KEYS.sync_lock)
                    seen["deaths"] += 1
            await asyncio.sleep(0)
        syncs_done.set()

    async def traffic() -> None:
        await asyncio.gather(*(viewer(n) for n in range(10)))
        traffic_done.set()

    await asyncio.gather(traffic(), reader(), syncs())
    await world.sync().run()

    await world.check_settled()
    assert seen["reads"] > 0 and seen["crashes"] > 0 and seen["deaths"] > 0, seen
    final = {
        **await world.tracker.get_view_counts("story", STORY_IDS),
        **await world.tracker.get_view_counts("task", TASK_IDS),
    }
    assert final == {content_id: world.accepted[(t, content_id)] for t, content_id in CONTENTS}


# Read-through safety: a cache fill racing a sync --------------------------------------------------


def race_the_database_read(
    world: World, during: Callable[[], Awaitable[None]], *, before: bool = False
) -> None:
    """Make the next database read of counts run ``during`` (after the read, or before it)."""
    original = world.store.read_counts

    async def racing(*args: Any, **kwargs: Any) -> tuple[dict[str, int], bool]:
        world.store.read_counts = original  # type: ignore[method-assign]
        if before:
            await during()
            return await original(*args, **kwargs)
        result = await original(*args, **kwargs)
        await during()
        return result

    world.store.read_counts = racing  # type: ignore[method-assign]


async def evict(world: World, contents: Iterable[tuple[str, str]] = CONTENTS) -> None:
    await world.redis.delete(*(KEYS.database_count(*content) for content in contents))


async def check_cache_matches_database(world: World) -> None:
    """With no batch unsettled, a cached database count must be the database count."""
    assert not (await world.batch())[0]
    for content in world.contents():
        cached = (await world.parts(content))[2]
        if cached is not None:
            assert cached == await world.tracker.get_database_view_count(*content), content


@pytest.mark.parametrize("sync_runs", ["after-the-read", "before-the-read"])
async def test_a_cache_fill_racing_a_full_sync_never_caches_a_stale_count(
    world: World, sync_runs: str
) -> None:
    await settled_world(world)
    world.clock.advance(DAY)
    await world.traffic(range(3))
    await evict(world)

    async def full_sync() -> None:
        report = await world.sync().run()
        assert report.views == 30

    race_the_database_read(world, full_sync, before=sync_runs == "before-the-read")
    details = await world.tracker.get_view_count_details("story", STORY_IDS)

    for content_id, count in details.items():
        assert count is None or count.total == world.accepted[("story", content_id)]
    await check_cache_matches_database(world)
    await world.check_settled()
    assert await world.tracker.get_view_counts("story", STORY_IDS) == dict.fromkeys(STORY_IDS, 5)


@pytest.mark.parametrize("parked_at", ["before_commit", "committed", "mid-settle"])
async def test_a_cache_fill_during_an_unsettled_batch_caches_the_settled_base(
    world: World, parked_at: str
) -> None:
    """Fills while a batch is uncommitted, committed, or half settled; the commit may land
    during the read. Whatever is cached must end up equal to the database once settled."""
    await settled_world(world)
    world.clock.advance(DAY)
    await world.traffic(range(3))
    hook = Hook()
    step, nth = ("settle", 2) if parked_at == "mid-settle" else (parked_at, 1)
    gate = hook.park_at(step, nth)
    after_commit = hook.park_at("committed")
    if parked_at == "mid-settle":
        after_commit.open()
    sync = world.start(world.sync(on_step=hook).run())
    await gate.must_be_reached_by(sync)
    await evict(world)

    async def commit_now() -> None:  # no-op unless the sync is parked before its commit
        if parked_at == "before_commit":
            gate.open()
            await after_commit.must_be_reached_by(sync)

    race_the_database_read(world, commit_now, before=True)
    for content_type, ids in (("story", STORY_IDS), ("task", TASK_IDS)):
        counts = await world.tracker.get_view_counts(content_type, ids)
        assert counts == {i: world.accepted[(content_type, i)] for i in ids}
    await world.check_conservation()

    gate.open()
    after_commit.open()
    await sync
    await check_cache_matches_database(world)
    await world.check_settled()


async def test_get_view_count_survives_a_sync_during_its_database_read(world: World) -> None:
    """``get_view_count`` returns an int; a fill refused because a sync ran must not break it."""
    await settled_world(world)
    await world.traffic(range(2, 3))
    await evict(world)

    async def full_sync() -> None:
        await world.sync().run()

    race_the_database_read(world, full_sync)
    count = await world.tracker.get_view_count("task", "t1")

    assert count == world.accepted[("task", "t1")] == 3


# Ids the database cannot tell apart ---------------------------------------------------------------


async def test_story_ids_that_name_the_same_row_are_not_lost_or_doubled(
    real_world: World,
) -> None:
    """``"7"`` and ``"07"`` are different contents to Redis but one row of an integer table.

    Whether viewmw refuses ``"07"``, or treats it as ``"7"``: the row must end up with exactly
    the views accepted for the ids that name it, and reading either id must show that row.
    """
    world = real_world
    async with world.store.engine.begin() as connection:
        await connection.execute(stories.insert(), [{"id": 7, "view_count": 0}])
    for content_id, viewer in (("7", "user:1"), ("07", "user:2"), ("07", "user:3")):
        with contextlib.suppress(InvalidKeyError):
            await world.view(("story", content_id), viewer)
    accepted = sum(world.accepted.values())
    assert accepted >= 1

    await world.sync().run()

    async with world.store.engine.connect() as connection:
        row = (await connection.execute(select(stories.c.view_count))).scalar_one()
    assert row == accepted, f"row 7 holds {row} views; {accepted} were accepted for 7 and 07"
    assert await world.tracker.get_database_view_count("story", "7") == row
    if world.accepted[("story", "07")]:
        assert await world.tracker.get_database_view_count("story", "07") == row


async def test_a_sync_ends_while_views_keep_arriving(world: World) -> None:
    """sync.py: "Views that keep arriving wait for the next run, so a run always ends".

    Before every snapshot chunk, each content the last chunk moved gets a new view: the dirty
    set refills as fast as the chunks drain it. The run must still end.
    """
    world.permissive()
    await world.seed()
    await world.traffic(range(2))
    chunks = 0
    before: dict[str, int] = {}

    async def steady_traffic(step: str) -> None:
        nonlocal chunks, before
        if step != "snapshot":
            return
        assert chunks < 50, "the sync kept snapshotting the views that kept arriving"
        chunks += 1
        _, items = await world.batch()
        for member, amount in items.items():
            if amount != before.get(member):  # moved by the last chunk
                await world.view(KeySchema.split_member(member), "user:99")
        before = items

    report = await world.sync(on_step=steady_traffic).run()

    assert report.views >= 20
    await world.check_conservation()
    await world.sync().run()
    await world.check_settled()


async def test_the_store_gets_a_batch_in_content_id_order(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Integer ids in numeric order (each bulk statement then walks the table in order), other
    ids in their own order after; every delta still arrives once."""
    await world.seed()
    async with world.store.engine.begin() as connection:
        await connection.execute(
            stories.insert(), [{"id": i, "view_count": 0} for i in (9, 10, 100)]
        )
    contents = [("story", i) for i in ("10", "2", "9", "1", "100")] + [("task", "b"), ("task", "a")]
    await world.traffic(range(1), contents)
    orders: list[list[tuple[str, str]]] = []
    commit = world.store.commit_batch

    async def recording(batch_id: str, started_at: datetime, deltas: Any, **kw: Any) -> Any:
        orders.append(list(deltas))
        return await commit(batch_id, started_at, deltas, **kw)

    monkeypatch.setattr(world.store, "commit_batch", recording)
    await world.sync(chunk_contents=2).run()

    assert orders == [
        [("story", i) for i in ("1", "2", "9", "10", "100")] + [("task", "a"), ("task", "b")]
    ]
    await world.check_settled()
