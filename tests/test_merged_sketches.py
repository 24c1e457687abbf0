"""A period's kept sketches, merged in Redis by one read, serve the next reads of the same sync
epoch (viewmw.viewer_estimates): a list page read again between two syncs reads no sketch from
the database, and answers exactly as the read that merges every sketch itself. A sync retires
them (the epoch is in their names), and none is made while a batch is unsettled.

Real Redis with PostgreSQL and SQLite, and a real local Redis Cluster with PostgreSQL."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import update

from tests.support import FakeClock
from tests.test_history_viewers import (
    backend,
    five_days,
    offer,
    spy_on_sketches,
    three_overlapping_days,
)
from tests.test_sync import Hook, InjectedCrash
from viewmw import Period, Settings, Store, ViewStats, ViewSync, daily_views
from viewmw.viewer_estimates import MERGED_SKETCH_MS

__all__ = ["backend"]  # a fixture, imported to be used here

IDS = [1, 2, 3, 4, 9, 10]


def merging_every_sketch(stats: ViewStats) -> ViewStats:
    """The same reads, without merged sketches: every kept sketch read and merged each time."""
    plain = ViewStats(stats.redis, stats.store, stats.settings, clock=stats.clock)
    plain._merges = lambda *_: False  # type: ignore[method-assign]
    return plain


async def merged_keys(redis: Any) -> list[bytes]:
    return sorted([key async for key in redis.scan_iter(match="*viewmw:kept:*")])


async def test_a_read_again_before_the_next_sync_reads_no_sketch_and_answers_the_same(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> None:
    redis = backend[0]
    _, _, stats = await five_days(backend, clock)
    asked = spy_on_sketches(stats)

    first = await stats.views_many("story", IDS, Period.last_days(5))
    # No content has a merged sketch yet: one statement reads the counts and the sketches.
    assert len(asked) == 1 and asked[0] is not None
    assert len(await merged_keys(redis)) == len(IDS)
    for key in await merged_keys(redis):
        assert 0 < await redis.pttl(key) <= MERGED_SKETCH_MS

    asked.clear()
    again = await stats.views_many("story", IDS, Period.last_days(5))
    assert again == first
    assert asked == [None]  # the merged sketches served: no sketch read
    expected = await merging_every_sketch(stats).views_many("story", IDS, Period.last_days(5))
    assert first == expected
    assert {i: c.unique_viewers for i, c in first.items()} == {
        "1": 10,
        "2": 9,
        "3": 11,
        "4": 13,
        "9": 3,
        "10": 0,
    }
    assert [key async for key in redis.scan_iter(match="*scratch*")] == []


async def test_a_sync_retires_the_merged_sketches_of_its_epoch(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    tracker, sync, stats = await three_overlapping_days(real_redis, store, settings, clock)
    assert (await stats.views("story", 1, Period.last_days(3))).unique_viewers == 50

    # The oldest day's sketch gains ten viewers in the history (as a sync's commit would).
    await real_redis.pfadd("more", *(f"user:{n}" for n in [*range(30), *range(200, 210)]))
    sketch = await real_redis.get("more")
    oldest = stats.today().toordinal() - 2
    async with store.engine.begin() as connection:
        await connection.execute(
            update(daily_views)
            .where(daily_views.c.day == date.fromordinal(oldest))
            .values(unique_sketch=sketch)
        )
    # The history changes only under a sync that moved the epoch first: until one does, the
    # merged sketch of this epoch answers.
    assert (await stats.views("story", 1, Period.last_days(3))).unique_viewers == 50

    await offer(tracker, 2, range(1))
    await sync.run()
    assert (await stats.views("story", 1, Period.last_days(3))).unique_viewers == 60


async def test_a_few_missing_merged_sketches_are_made_from_their_own_sketches_alone(
    backend: tuple[Any, Store, Settings], clock: FakeClock
) -> None:
    redis = backend[0]
    _, _, stats = await five_days(backend, clock)
    expected = await stats.views_many("story", IDS, Period.last_days(5))
    gone = [key for key in await merged_keys(redis) if key.endswith(b":3")]
    assert len(gone) == 1
    await redis.delete(*gone)
    asked = spy_on_sketches(stats)

    assert await stats.views_many("story", IDS, Period.last_days(5)) == expected
    # The counts alone, then the sketches of the one content whose merged sketch was gone.
    assert len(asked) == 2 and asked[0] is None and asked[1] is not None
    assert len(await merged_keys(redis)) == len(IDS)


async def test_a_merged_sketch_that_expires_during_the_read_is_made_again(
    backend: tuple[Any, Store, Settings], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = backend[0]
    _, _, stats = await five_days(backend, clock)
    expected = await stats.views_many("story", IDS, Period.last_days(5))
    # Every merged sketch found by read_days, then gone before the estimates (their TTL ran
    # out between): the history's counts are read in between.
    rows = stats._rows

    async def rows_then_gone(*args: Any) -> Any:
        found = await rows(*args)
        if kept := await merged_keys(redis):  # the first time only: then they are made again
            await redis.delete(*kept)
        return found

    monkeypatch.setattr(stats, "_rows", rows_then_gone)
    asked = spy_on_sketches(stats)
    assert await stats.views_many("story", IDS, Period.last_days(5)) == expected
    # Found at first (the counts came alone), then made again from their own sketches.
    assert len(asked) == 2 and asked[0] is None and asked[1] is not None
    assert len(await merged_keys(redis)) == len(IDS)


@pytest.mark.parametrize("step", ["sealed", "committed"])
async def test_no_merged_sketch_is_made_while_a_batch_is_unsettled(
    backend: tuple[Any, Store, Settings], clock: FakeClock, step: str
) -> None:
    redis = backend[0]
    tracker, _, stats = await five_days(backend, clock)
    await offer(tracker, 3, range(50, 52))
    hook = Hook()
    hook.crash_at(step)
    with pytest.raises(InjectedCrash):
        await ViewSync(redis, backend[1], stats.settings, clock=clock, on_step=hook).run()

    counts = await stats.views_many("story", IDS, Period.last_days(5))
    assert counts == await merging_every_sketch(stats).views_many("story", IDS, Period.last_days(5))
    assert (counts["3"].views, counts["3"].unique_viewers) == (22, 13)
    assert await merged_keys(redis) == []


@pytest.mark.parametrize("period", [Period.all_time(), Period.last_days(3), Period.last_days(1)])
async def test_every_period_answers_as_the_plain_merge(
    backend: tuple[Any, Store, Settings], clock: FakeClock, period: Period
) -> None:
    _, _, stats = await five_days(backend, clock)
    expected = await merging_every_sketch(stats).views_many("story", IDS, period)
    for _ in range(2):  # the read that merges, then the one that uses the merged sketches
        assert await stats.views_many("story", IDS, period) == expected
    assert await stats.views("story", 4, period) == expected["4"]
