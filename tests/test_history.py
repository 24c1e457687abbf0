"""The per-day history: every view lands in its own calendar day's row, exactly once.

Views are made on three consecutive days in a zone that is not UTC, across the end of daylight
saving time (a 25-hour day), with syncs at arbitrary moments in between, some of them failing or
dying at every step. Each day's row must hold exactly that day's views, whatever happened; reads
(:class:`viewmw.ViewStats`) must show them exactly while a sync is half done too.

The harness (``World``, ``Hook``) is the sync suite's; the backends are the same three pairs, and
a real local Redis Cluster with PostgreSQL (every content in its own shard's keys, each shard
synced batch by batch): there the faults are those that leave the shards in different states
when the reads run (some synced, one committed and not settled, the rest not snapshotted yet).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from tests.test_sync import CONTENTS, KEYS, Hook, InjectedCrash, World, any_backends, any_world
from tests.test_sync_faults import FAULTS
from viewmw import Period, ViewStats, daily_views
from viewmw.sync import LockLostError

__all__ = ["any_backends", "any_world"]  # fixtures, imported to be used here

SINGLE_REDIS = ["redis-postgresql", "redis-sqlite", "fakeredis-sqlite"]
CLUSTER = "cluster-postgresql"
# On a cluster the sync goes shard by shard: stopped at the second snapshot or settle, one
# shard is done and the others are not; at the commit, one shard's batch is in the database
# while Redis still holds it.
CLUSTER_FAULTS = {
    "mid-snapshot-death",
    "committed-exception",
    "committed-death",
    "mid-settle-death",
}
FAULT_CASES = [
    *(
        pytest.param(backend, *fault.values, id=f"{backend}-{fault.id}")
        for backend in SINGLE_REDIS
        for fault in FAULTS
    ),
    *(
        pytest.param(CLUSTER, *fault.values, id=f"{CLUSTER}-{fault.id}")
        for fault in FAULTS
        if fault.id in CLUSTER_FAULTS
    ),
]

BERLIN = ZoneInfo("Europe/Berlin")
# 2025-10-25 23:50 in Berlin (CEST, UTC+2); summer time ends at 03:00 the next night.
LATE_ON_D = datetime(2025, 10, 25, 21, 50, tzinfo=UTC).timestamp()
D, D1, D2 = date(2025, 10, 25), date(2025, 10, 26), date(2025, 10, 27)


class History:
    """A world in Berlin time with every rule off, and what each content got on each day."""

    def __init__(self, world: World) -> None:
        world.settings = world.settings.replace(timezone="Europe/Berlin")
        self.world = world.permissive()
        self.world.clock.now = LATE_ON_D
        self.expected: Counter[tuple[tuple[str, str], date]] = Counter()
        self.viewer = 0

    def today(self) -> date:
        return datetime.fromtimestamp(self.world.clock(), BERLIN).date()

    async def views(self, contents: list[tuple[str, str]] = CONTENTS) -> None:
        """A new viewer views each content once; every view counts, on today's local day."""
        self.viewer += 1
        for content in contents:
            assert (await self.world.view(content, f"user:{self.viewer}")).counted
            self.expected[(content, self.today())] += 1

    def stats(self) -> ViewStats:
        return ViewStats(
            self.world.redis, self.world.store, self.world.settings, clock=self.world.clock
        )

    async def stored(self) -> Counter[tuple[tuple[str, str], date]]:
        """The history table's views, per (content, day)."""
        async with self.world.store.engine.connect() as connection:
            rows = await connection.execute(
                select(
                    daily_views.c.content_type,
                    daily_views.c.content_id,
                    daily_views.c.day,
                    daily_views.c.views,
                )
            )
            return Counter({((t, i), d): v for t, i, d, v in rows if v})

    async def check_reads(self) -> None:
        """What ViewStats shows per day is exactly what was counted on that day."""
        stats = self.stats()
        period = Period.between(D, D2)
        for content in CONTENTS:
            days = await stats.by_day(*content, period)
            assert {d.day: d.views for d in days} == {
                day: self.expected[(content, day)] for day in (D, D1, D2)
            }, content
            assert all(d.crawler_views == 0 for d in days)
        totals = await stats.views_many("story", [i for t, i in CONTENTS if t == "story"], period)
        for content_id, count in totals.items():
            assert count.views == sum(
                self.expected[(("story", content_id), d)] for d in (D, D1, D2)
            )

    async def check_settled(self) -> None:
        await self.world.check_settled()
        assert await self.stored() == +self.expected
        assert [key async for key in self.world.redis.scan_iter(match="*:days:*")] == []
        await self.check_reads()


@pytest.fixture
def history(any_world: World) -> History:
    return History(any_world)


async def test_views_land_on_their_own_day_across_midnight_and_the_dst_change(
    history: History,
) -> None:
    world = history.world
    await world.seed()
    await history.views()  # D, 23:50
    world.clock.advance(15 * 60)  # D+1, 00:05 (CEST)
    assert history.today() == D1
    await history.check_reads()
    await world.sync().run()  # at 00:05: D's views must stay on D
    await history.check_settled()
    await history.views()
    world.clock.advance(3 * 3600)  # 03:05 CEST has become 02:05 CET
    await history.views(CONTENTS[:3])
    world.clock.advance(21 * 3600 + 40 * 60)  # D+1 23:45 CET: the 25-hour day is not over yet
    assert history.today() == D1
    await history.views(CONTENTS[2:5])
    world.clock.advance(20 * 60)  # D+2, 00:05 CET
    assert history.today() == D2
    await history.views(CONTENTS[4:])
    await history.check_reads()
    await world.sync().run()
    await history.check_settled()
    assert {day for _, day in await history.stored()} == {D, D1, D2}


@pytest.mark.parametrize(
    ("any_backends", "fault", "step", "nth"), FAULT_CASES, indirect=["any_backends"]
)
async def test_a_fault_at_any_step_keeps_every_day_exact(
    history: History, step: str, nth: int, fault: str
) -> None:
    world = history.world
    await world.seed()
    await history.views()  # D 23:50
    world.clock.advance(15 * 60)
    await history.views()  # D+1 00:05
    # Views pending in the history table's own past: the sync must keep them on D and D+1.

    hook = Hook()
    crashed = world.sync(on_step=hook)
    if fault == "exception":
        hook.crash_at(step, nth)
        with pytest.raises(InjectedCrash):
            await crashed.run()
    else:
        gate = hook.park_at(step, nth)
        dead = world.start(crashed.run())
        await gate.must_be_reached_by(dead)
        await world.redis.delete(world.keys.sync_lock)  # stands in for the lock's expiry
    await world.check_conservation()
    await history.check_reads()  # exact while the batch is half done

    world.clock.advance(23 * 3600 + 55 * 60)  # D+1 23:00 CET (after the DST change)
    assert history.today() == D1
    await history.views(CONTENTS[:4])
    world.clock.advance(3600 + 5 * 60)  # D+2 00:05
    assert history.today() == D2
    await history.views(CONTENTS[4:])
    await history.check_reads()

    await world.sync().run()
    await history.check_settled()

    if fault == "death":
        stored = await history.stored()
        gate.open()
        (outcome,) = await _outcomes(dead)
        assert isinstance(outcome, LockLostError), repr(outcome)
        assert await history.stored() == stored
        await world.sync().run()
        await history.check_settled()


async def _outcomes(*tasks: object) -> list[object]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))  # type: ignore[arg-type]


# Keys of a version before the history: never on a cluster.
@pytest.mark.parametrize("any_backends", SINGLE_REDIS, indirect=True)
async def test_views_pending_from_before_the_history_go_to_the_day_of_the_sync(
    history: History,
) -> None:
    """A pending counter without a days hash (counted by a version without the history) is
    moved whole, its views given to the day the sync runs."""
    world = history.world
    await world.seed()
    await world.redis.set(KEYS.pending("story", "1"), 4)
    await world.redis.sadd(KEYS.dirty, "story:1")
    world.accepted[("story", "1")] += 4
    await history.views(CONTENTS[:1])

    await world.sync().run()

    await world.check_settled()
    assert (await history.stored())[(("story", "1"), D)] == 5
