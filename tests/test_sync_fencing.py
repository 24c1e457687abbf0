"""Fencing: a sync whose lock expired never commits, reads or settles a batch it no longer owns.

A sync (A) stops at a step boundary (a GC pause, a stopped VM, SIGSTOP) long enough for its lock
to expire; views arrive; another sync (B) takes the lock, with a newer fence, and works. When A
wakes up it must raise :class:`LockLostError` having changed nothing, whichever step it stopped
at and wherever B is (finished, or itself stopped at any step): no view doubled, none lost, and
database + pending + syncing = accepted throughout.

Then the database side alone: a commit carrying an older fence than one already committed is
refused, on PostgreSQL and SQLite.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text

from tests.test_sync import (
    CONTENTS,
    DAY,
    KEYS,
    STEP_POINTS,
    Hook,
    World,
    backends,
    real_world,
    world,
)
from viewmw import Store
from viewmw.errors import LockLostError, StaleFenceError
from viewmw.store import sync_fence, view_counts

__all__ = ["backends", "real_world", "world"]  # fixtures, imported to be used here

# Every step boundary a sync reaches, "sealed" (the batch is sealed, its items not read yet: the
# boundary of the original report) included.
POINTS = STEP_POINTS
POINT_IDS = [f"{step}-{nth}" for step, nth in POINTS]


async def stale_and_fresh_views(world: World) -> None:
    """Yesterday's views (synced: stale daily keys for cleanup) and today's, pending."""
    await world.seed()
    await world.traffic(range(2))
    await world.sync().run()
    world.clock.advance(DAY)
    await world.traffic(range(2, 4))


async def expire_the_lock(world: World) -> None:
    """What the lock's expiry does while its holder is stopped."""
    await world.redis.delete(KEYS.sync_lock)


async def outcome(task: asyncio.Task[Any]) -> Any:
    return (await asyncio.gather(task, return_exceptions=True))[0]


async def test_the_reported_interleaving_commits_nothing_twice(world: World) -> None:
    """The report: A (nothing pending, ``--force``) seals an empty batch and stops before it
    reads the items; views arrive; A's lock expires; B drops A's empty batch, snapshots the new
    views and commits; A wakes up. It used to read B's items and commit them again."""
    await world.seed()
    hook = Hook()
    gate = hook.park_at("sealed")
    late = world.start(world.sync(on_step=hook).run(force=True))
    await gate.must_be_reached_by(late)
    await world.traffic(range(10), CONTENTS[:1])
    await expire_the_lock(world)

    taken_over = await world.sync().run()
    assert (taken_over.recovered_batches, taken_over.batches, taken_over.views) == (0, 1, 10)
    ledger = await world.ledger()

    gate.open()
    with pytest.raises(LockLostError):
        await late

    assert await world.ledger() == ledger
    assert await world.db_counts() == {
        content: world.accepted[content] for content in world.contents()
    }
    await world.check_settled()


@pytest.mark.parametrize(("step", "nth"), POINTS, ids=POINT_IDS)
async def test_a_sync_that_stalls_past_its_lock_at_any_step_changes_nothing(
    world: World, step: str, nth: int
) -> None:
    await stale_and_fresh_views(world)
    hook = Hook()
    gate = hook.park_at(step, nth)
    late = world.start(world.sync(on_step=hook).run(force=True))
    await gate.must_be_reached_by(late)
    await world.check_conservation()
    await world.traffic(range(4, 5))  # views arrive while it stalls
    await expire_the_lock(world)

    await world.sync().run()
    await world.check_settled()
    database, ledger = await world.db_counts(), await world.ledger()

    gate.open()
    with pytest.raises(LockLostError):
        await late

    assert await world.db_counts() == database
    assert await world.ledger() == ledger
    await world.check_settled()


# Every pair of boundaries once, on one of the two databases in turn (a checkerboard): each
# database still sees every boundary of A and every boundary of B, half of B's against each of A's.
# The pairs are about Redis' fencing; the database's own refusal of a stale fence is proven on
# both databases below, and every pair on both doubled the run's longest file for no new case.
PAIRS = [
    pytest.param(
        a_step, a_nth, b_step, b_nth, database, id=f"A-{POINT_IDS[a]}-B-{POINT_IDS[b]}-{database}"
    )
    for a, (a_step, a_nth) in enumerate(POINTS)
    for b, (b_step, b_nth) in enumerate(POINTS)
    for database in ["postgresql" if (a + b) % 2 == 0 else "sqlite"]
]


@pytest.mark.parametrize(("a_step", "a_nth", "b_step", "b_nth", "store"), PAIRS, indirect=["store"])
async def test_a_stalled_sync_wakes_up_while_the_new_holder_is_at_any_step(
    real_world: World, a_step: str, a_nth: int, b_step: str, b_nth: int
) -> None:
    """Every pair: A stalls at one boundary, its lock expires, B takes over and stops at
    another; A wakes up and runs to its end while B waits; then B finishes."""
    world = real_world
    await stale_and_fresh_views(world)
    a_hook, b_hook = Hook(), Hook()
    a_gate = a_hook.park_at(a_step, a_nth)
    late = world.start(world.sync(on_step=a_hook).run(force=True))
    await a_gate.must_be_reached_by(late)
    await world.traffic(range(4, 5))
    await expire_the_lock(world)

    b_gate = b_hook.park_at(b_step, b_nth)
    holder = world.start(world.sync(on_step=b_hook).run(force=True))
    await b_gate.must_be_reached_by(holder)
    await world.check_conservation()

    a_gate.open()
    assert isinstance(await outcome(late), LockLostError)
    await world.check_conservation()
    b_gate.open()
    assert not isinstance(await outcome(holder), Exception)

    await world.sync().run()
    await world.check_settled()


async def test_a_recovered_batch_becomes_the_recovering_syncs(world: World) -> None:
    """A crashed sync left its batch unsettled; the next lock holder takes it over under its own
    fence, so the sync that left it can neither read nor settle it any more."""
    await world.seed()
    await world.traffic(range(2))
    hook = Hook()
    gate = hook.park_at("committed")
    left = world.start(world.sync(on_step=hook).run())
    await gate.must_be_reached_by(left)
    fence_before = int(await world.redis.hget(KEYS.sync_batch, "fence") or 0)
    await expire_the_lock(world)

    recovering = Hook()
    taken = recovering.park_at("sealed")
    recovery = world.start(world.sync(on_step=recovering).run())
    await taken.must_be_reached_by(recovery)
    assert int(await world.redis.hget(KEYS.sync_batch, "fence") or 0) > fence_before

    gate.open()
    assert isinstance(await outcome(left), LockLostError)
    await world.check_conservation()
    taken.open()
    report = await recovery
    assert (report.recovered_batches, report.batches, report.views) == (1, 0, 0)
    await world.check_settled()


async def test_a_batch_left_by_the_previous_version_is_recovered(world: World) -> None:
    """Before fencing, the unsettled batch's items lived in one shared hash."""
    await world.seed()
    await world.traffic(range(2))
    crash = Hook()
    crash.crash_at("before_commit")
    with pytest.raises(Exception, match="injected"):
        await world.sync(on_step=crash).run()
    batch_id, items = await world.batch()
    await world.redis.rename(KEYS.sync_batch_items(batch_id), KEYS.legacy_sync_batch_items)
    await world.redis.hdel(KEYS.sync_batch, "fence", "sealed")

    report = await world.sync().run()

    assert (report.recovered_batches, report.views) == (1, sum(items.values()))
    assert not await world.redis.exists(KEYS.legacy_sync_batch_items)
    await world.check_settled()


async def test_a_fence_counter_lost_with_redis_moves_past_the_databases(world: World) -> None:
    """Redis lost its fence counter (a flush): the next sync must not have every commit
    refused as stale; it moves the counter past the fence the database holds."""
    await stale_and_fresh_views(world)
    await world.redis.delete(KEYS.sync_fence)
    await world.sync().run()
    database_fence = await world.store.read_fence()
    await world.redis.delete(KEYS.sync_fence)
    await world.traffic(range(4, 5))

    report = await world.sync().run()

    assert report.views == 10
    assert await world.store.read_fence() > database_fence
    await world.check_settled()


# The database side alone --------------------------------------------------------------------------


async def fence_row(store: Store) -> int | None:
    async with store.engine.connect() as connection:
        return await connection.scalar(select(sync_fence.c.fence))


async def generic_count(store: Store, content_id: str) -> int:
    async with store.engine.connect() as connection:
        value = await connection.scalar(
            select(view_counts.c.view_count).where(view_counts.c.content_id == content_id)
        )
    return int(value or 0)


async def test_the_database_refuses_a_commit_with_an_older_fence(store: Store) -> None:
    now = datetime.now(UTC)
    assert await store.read_fence() == 0
    assert await store.commit_batch("b5", now, {("task", "t1"): 5}, fence=5)
    assert await store.commit_batch("b5-again", now, {("task", "t1"): 1}, fence=5)  # same sync

    with pytest.raises(StaleFenceError):
        await store.commit_batch("b3", now, {("task", "t1"): 100}, fence=3)

    assert await generic_count(store, "t1") == 6
    assert {row["batch_id"] for row in await store.last_batches()} == {"b5", "b5-again"}
    assert await store.read_fence() == await fence_row(store) == 5
    # Fence 0 (the fallback, other callers) is not checked and does not move the fence.
    assert await store.commit_batch("unfenced", now, {("task", "t1"): 1})
    assert await store.commit_batch("b7", now, {("task", "t1"): 1}, fence=7)
    assert await store.read_fence() == 7
    assert await generic_count(store, "t1") == 8


async def test_apps_sharing_a_database_have_fences_of_their_own(store: Store) -> None:
    """Two apps (two key prefixes, two Redis fence counters) commit into one database."""
    now = datetime.now(UTC)
    assert await store.commit_batch("a", now, {("task", "t1"): 1}, fence=100, fence_scope="app1:")
    assert await store.commit_batch("b", now, {("task", "t1"): 1}, fence=5, fence_scope="app2:")
    with pytest.raises(StaleFenceError):
        await store.commit_batch("c", now, {("task", "t1"): 1}, fence=4, fence_scope="app2:")
    assert (await store.read_fence("app1:"), await store.read_fence("app2:")) == (100, 5)
    assert await store.read_fence() == 0
    assert await generic_count(store, "t1") == 2


async def test_a_stale_fence_is_refused_even_for_a_batch_already_in_the_ledger(
    store: Store,
) -> None:
    now = datetime.now(UTC)
    assert await store.commit_batch("b1", now, {("task", "t1"): 1}, fence=4)
    assert not await store.commit_batch("b1", now, {("task", "t1"): 1}, fence=4)
    with pytest.raises(StaleFenceError):
        await store.commit_batch("b1", now, {("task", "t1"): 1}, fence=2)
    assert await generic_count(store, "t1") == 1


async def test_racing_commits_the_newer_fence_wins_on_postgresql(pg_store: Store) -> None:
    """A newer sync's commit holds the fence row; an older sync's commit waits for it and, once
    it has committed, is refused (the row lock, not a read-then-write, decides)."""
    store = pg_store
    now = datetime.now(UTC)
    await store.commit_batch("first", now, {("task", "t1"): 1}, fence=1)
    async with store.engine.connect() as newer:
        transaction = await newer.begin()
        await newer.execute(text("UPDATE viewmw_sync_fence SET fence = 9 WHERE scope = ''"))
        older = asyncio.ensure_future(
            store.commit_batch("older", now, {("task", "t1"): 50}, fence=8)
        )
        try:
            await wait_until_blocked(store)
        finally:
            await transaction.commit()
            outcome = (await asyncio.gather(older, return_exceptions=True))[0]
        assert isinstance(outcome, StaleFenceError), repr(outcome)
    assert await generic_count(store, "t1") == 1
    assert await store.read_fence() == 9


async def wait_until_blocked(store: Store) -> None:
    """Until another session of this database waits on a row lock (polls the server's view)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with store.engine.connect() as probe:
        for _ in range(2000):
            if await probe.scalar(query):
                return
            await probe.rollback()  # statistics are a snapshot per transaction: take a new one
            await asyncio.sleep(0.005)  # another process's progress: no clock to move
    raise AssertionError("the older commit never waited for the newer one's row lock")
