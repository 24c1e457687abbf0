"""The sync under faults: an exception or a process death at every step, and a refused commit.

For every step boundary a sync reaches (``locked``, the first and a middle ``snapshot`` chunk,
``sealed``, ``before_commit``, ``committed``, the first and a middle ``settle`` chunk,
``cleanup``), the sync either raises there or stops there for good while its lock expires (at
``history``, inside the database transaction, it raises). Right
then, and after views keep arriving, every content's views are conserved; a fresh sync then
completes everything exactly once; and the dead sync, should it ever wake up, changes nothing.

Runs on the real Redis with PostgreSQL and with SQLite, and on fakeredis with SQLite; the fault at
every step also on a real local Redis Cluster with PostgreSQL, where the sync recovers and syncs
each content shard under the one lock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from tests.test_sync import (
    CONTENTS,
    DAY,
    KEYS,
    Hook,
    InjectedCrash,
    World,
    any_backends,
    any_world,
    backends,
    settled_world,
    world,
)
from viewmw import Store
from viewmw.sync import LockLostError

__all__ = ["any_backends", "any_world", "backends", "world"]  # fixtures, imported to be used here

BOUNDARIES = [
    pytest.param("locked", 1, id="locked"),
    pytest.param("snapshot", 1, id="first-snapshot"),
    pytest.param("snapshot", 2, id="mid-snapshot"),
    pytest.param("sealed", 1, id="sealed"),
    pytest.param("before_commit", 1, id="before-commit"),
    pytest.param("committed", 1, id="committed"),
    pytest.param("settle", 1, id="first-settle"),
    pytest.param("settle", 2, id="mid-settle"),
    pytest.param("cleanup", 1, id="cleanup"),
]
# "history" (before each chunk of the batch's history rows is made) falls inside the database
# transaction: the rows are made while it adds the totals. A sync raises there, and the
# transaction rolls back. It is not stopped there for good: its open transaction would keep the
# locks that the next sync's commit waits for until the database ends it (the connection of a
# dead process closes); that wait is the database's, not the protocol's.
RAISES_ONLY = [pytest.param("history", 1, id="history")]
FAULTS = [
    pytest.param(fault, *point.values, id=f"{point.id}-{fault}")
    for point in BOUNDARIES
    for fault in ("exception", "death")
] + [pytest.param("exception", *point.values, id=f"{point.id}-exception") for point in RAISES_ONLY]
BACKENDS = ["redis-postgresql", "redis-sqlite", "fakeredis-sqlite", "cluster-postgresql"]
# Every fault on every backend, but a death on fakeredis: a death leaves Redis' state to the next
# process, and fakeredis (the embedded mode) lives and dies with its process. A stall there (the
# lock expiring while a sync waits, in one process) is tests/test_sync_fencing.py's, on fakeredis
# too; the same script on a real Redis proves the death.
FAULTS_ON_BACKENDS = [
    pytest.param(backend, *fault.values, id=f"{backend}-{fault.id}")
    for backend in BACKENDS
    for fault in FAULTS
    if not (backend.startswith("fakeredis") and fault.values[0] == "death")
]


async def yesterday_and_today(world: World) -> tuple[str, list[str]]:
    """Views yesterday (their daily keys are stale now) and today; one blocked repeat view."""
    await world.seed()
    await world.traffic(range(3))
    assert not (await world.view(CONTENTS[0], "user:0")).counted  # once per day
    yesterday = world.day()
    world.clock.advance(DAY)
    await world.traffic(range(2))
    stale = await world.daily_keys(yesterday)
    assert len(stale) == 3
    return yesterday, stale


@pytest.mark.parametrize(
    ("any_backends", "fault", "step", "nth"), FAULTS_ON_BACKENDS, indirect=["any_backends"]
)
async def test_a_fault_at_any_step_loses_nothing_and_counts_nothing_twice(
    any_world: World, step: str, nth: int, fault: str
) -> None:
    world = any_world
    yesterday, _ = await yesterday_and_today(world)
    hook = Hook()
    crashed = world.sync(on_step=hook)
    if fault == "exception":
        hook.crash_at(step, nth)
        with pytest.raises(InjectedCrash):
            await crashed.run()
        assert not await world.redis.exists(world.keys.sync_lock), "the lock outlived the exception"
    else:
        gate = hook.park_at(step, nth)
        dead = world.start(crashed.run())
        await gate.must_be_reached_by(dead)
        await world.redis.delete(world.keys.sync_lock)  # stands in for the lock's expiry
    assert hook.seen[step] == nth

    await world.check_conservation()
    await world.traffic(range(3, 5))  # views keep arriving before anyone recovers
    await world.check_conservation()
    in_database = sum((await world.db_counts()).values())

    report = await world.sync().run()

    assert not report.already_running
    assert report.views == sum(world.accepted.values()) - in_database
    await world.check_settled()
    assert await world.daily_keys(yesterday) == []
    assert len(await world.daily_keys(world.day())) == 4  # users 0, 1, 3, 4: untouched

    if fault == "death":
        # The dead sync wakes up after all (a stalled process, not a dead one): no effect.
        database, ledger = await world.db_counts(), await world.ledger()
        gate.open()
        outcome = (await _outcomes(dead))[0]
        assert isinstance(outcome, LockLostError), repr(outcome)
        assert await world.db_counts() == database
        assert await world.ledger() == ledger
        await world.check_conservation()
        await world.sync().run()
        await world.check_settled()


async def _outcomes(*tasks: Any) -> list[Any]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_a_sync_that_lost_its_lock_leaves_no_batch_behind(world: World) -> None:
    """A sync that stalled past its lock's expiry wakes up while views are pending.

    It may not move anything (the lock is not its own), and it must not leave an empty batch
    behind either: an unsettled batch blocks cleanup, and makes a sync that holds the lock fail
    with "an unsettled batch appeared" when it starts its next batch.
    """
    await yesterday_and_today(world)
    hook = Hook()
    gate = hook.park_at("locked")
    stalled = world.start(world.sync(on_step=hook).run())
    await gate.must_be_reached_by(stalled)
    await world.redis.delete(KEYS.sync_lock)
    await world.sync().run()
    world.clock.advance(301)
    await world.traffic(range(3, 4))  # pending again when the stalled sync wakes up

    gate.open()
    outcome = (await _outcomes(stalled))[0]

    assert isinstance(outcome, LockLostError), repr(outcome)
    await world.check_conservation()
    assert not await world.redis.exists(KEYS.sync_batch), "an empty batch was left behind"
    await world.sync().run()
    await world.check_settled()


@pytest.mark.parametrize("first", ["exception", "death"])
async def test_recovery_itself_may_fail_at_every_step(world: World, first: str) -> None:
    """A sync dies mid-settle, then each recovery attempt fails at the next step; no view is
    lost or doubled along the way and the last attempt completes."""
    await world.seed()
    await world.traffic(range(3))
    hook = Hook()
    if first == "exception":
        hook.crash_at("settle", 2)
        with pytest.raises(InjectedCrash):
            await world.sync(on_step=hook).run()
    else:
        gate = hook.park_at("settle", 2)
        await gate.must_be_reached_by(world.start(world.sync(on_step=hook).run()))
        await world.redis.delete(KEYS.sync_lock)
    await world.check_conservation()

    for step, nth in [("locked", 1), ("before_commit", 1), ("committed", 1), ("settle", 1)]:
        await world.traffic(range(3, 4), CONTENTS[:1])
        world.clock.advance(301)
        retry = Hook()
        retry.crash_at(step, nth)
        with pytest.raises(InjectedCrash):
            await world.sync(on_step=retry).run()
        await world.check_conservation()

    report = await world.sync().run()
    assert report.recovered_batches == 1
    await world.check_settled()


# The refused commit -------------------------------------------------------------------------------

REFUSE = "viewmw_test_refuse_commit"


async def refuse_commits(store: Store, *, on: bool) -> None:
    """Make the real database refuse every ledger insert (a trigger), or stop refusing."""
    if store.dialect == "postgresql":
        statements = (
            [
                f"CREATE OR REPLACE FUNCTION {REFUSE}() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
                f"CREATE TRIGGER {REFUSE} BEFORE INSERT ON viewmw_sync_batches "
                f"FOR EACH ROW EXECUTE FUNCTION {REFUSE}()",
            ]
            if on
            else [
                f"DROP TRIGGER IF EXISTS {REFUSE} ON viewmw_sync_batches",
                f"DROP FUNCTION IF EXISTS {REFUSE}()",
            ]
        )
    else:
        statements = (
            [
                f"CREATE TRIGGER {REFUSE} BEFORE INSERT ON viewmw_sync_batches "
                f"BEGIN SELECT RAISE(ABORT, 'commit refused by the test'); END"
            ]
            if on
            else [f"DROP TRIGGER IF EXISTS {REFUSE}"]
        )
    async with store.engine.begin() as connection:
        for statement in statements:
            await connection.execute(text(statement))


async def test_a_refused_commit_leaves_redis_untouched_for_the_retry(world: World) -> None:
    synced = await settled_world(world)
    world.clock.advance(DAY)
    await world.traffic(range(3))
    database, ledger = await world.db_counts(), await world.ledger()
    at_commit: list[dict[str, Any]] = []
    hook = Hook()

    async def remember() -> None:
        at_commit.append(await world.redis_state())

    hook.call_at("before_commit", remember)

    await refuse_commits(world.store, on=True)
    try:
        with pytest.raises(SQLAlchemyError):
            await world.sync(on_step=hook).run()
        after = await world.redis_state()
        assert after == at_commit[0]  # exactly as the snapshot left it
        ((_, items),) = after["batches"]  # one Redis, one batch
        assert sum(items.values()) == 30 and len(items) == 10
        assert all(pending == 0 for pending, _ in after["parts"].values())
        assert await world.db_counts() == database
        assert await world.ledger() == ledger
        assert not await world.redis.exists(KEYS.sync_lock)
        await world.check_conservation()

        # A retry while the database still refuses changes nothing either.
        with pytest.raises(SQLAlchemyError):
            await world.sync().run()
        assert await world.redis_state() == after
        assert await world.db_counts() == database
    finally:
        await refuse_commits(world.store, on=False)

    report = await world.sync().run()
    assert (report.recovered_batches, report.batches, report.views) == (1, 1, 30)
    await world.check_settled()
    assert sum((await world.db_counts()).values()) == synced + 30
