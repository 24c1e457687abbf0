"""Period counts and rankings against a simple model, on seeded random traffic.

Views arrive over several days at random moments, syncs run (and sometimes fail) in between;
after every step, :class:`viewmw.ViewStats` must answer exactly as a plain count of the views per
(content, day) does: ``views_many``, ``by_day`` and ``top`` for several periods.

On the real Redis and fakeredis every seed runs; on a real local Redis Cluster one does, with four
content shards, so that a shard holds several of the contents: each read then merges the shards'
answers (and ``top`` the shards' rankings, some of them cut at its ``n``), each shard with its own
sync batch and epoch.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest

from tests.test_sync import CONTENTS, Hook, InjectedCrash, World, any_backends, any_world
from viewmw import Period, Settings, ViewStats

__all__ = ["any_backends", "any_world"]  # fixtures, imported to be used here

SEEDS = [3, 17, 2024]
SINGLE_REDIS = ["redis-postgresql", "redis-sqlite", "fakeredis-sqlite"]
CASES = [
    *(
        pytest.param(backend, seed, id=f"{backend}-{seed}")
        for backend in SINGLE_REDIS
        for seed in SEEDS
    ),
    pytest.param("cluster-postgresql", 17, id="cluster-postgresql-17"),
]
STEPS = ["snapshot", "sealed", "before_commit", "committed", "settle"]


class Model:
    def __init__(self, world: World) -> None:
        self.world = world.permissive()
        self.views: Counter[tuple[tuple[str, str], date]] = Counter()
        self.viewer = 0

    def today(self) -> date:
        return datetime.fromtimestamp(self.world.clock(), UTC).date()

    async def view(self, content: tuple[str, str]) -> None:
        self.viewer += 1
        assert (await self.world.view(content, f"user:{self.viewer}")).counted
        self.views[(content, self.today())] += 1

    def count(self, content: tuple[str, str], first: date | None, last: date | None) -> int:
        return sum(
            views
            for (c, day), views in self.views.items()
            if c == content and (first is None or day >= first) and (last is None or day <= last)
        )

    def periods(self) -> list[Period]:
        today = self.today()
        return [
            Period.today(),
            Period.last_days(2),
            Period.last_days(30),
            Period.all_time(),
            Period.between(today - timedelta(days=2), today - timedelta(days=1)),
        ]

    async def check(self, rng: random.Random) -> None:
        stats = ViewStats(
            self.world.redis, self.world.store, self.world.settings, clock=self.world.clock
        )
        for period in self.periods():
            first, last = period.resolve(self.today())
            for content_type in ("story", "task"):
                ids = [i for t, i in CONTENTS if t == content_type]
                counts = await stats.views_many(content_type, ids, period)
                assert {i: c.views for i, c in counts.items()} == {
                    i: self.count((content_type, i), first, last) for i in ids
                }, (period, content_type)
                expected = sorted(
                    ((i, self.count((content_type, i), first, last)) for i in ids),
                    key=lambda item: (-item[1], item[0]),
                )
                limit = rng.randint(1, 6)
                assert (
                    await stats.top(content_type, period, limit)
                    == [item for item in expected if item[1] > 0][:limit]
                ), (period, content_type, limit)
        content = rng.choice(CONTENTS)
        days = await stats.by_day(*content, Period.last_days(4))
        assert [(d.day, d.views) for d in days] == [
            (
                self.today() - timedelta(days=n),
                self.count(content, *(2 * [self.today() - timedelta(days=n)])),
            )
            for n in range(3, -1, -1)
        ]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Four content shards on a cluster (read only with a cluster URL): several contents each."""
    return settings.replace(cluster_shards=4)


@pytest.mark.parametrize(("any_backends", "seed"), CASES, indirect=["any_backends"])
async def test_period_counts_and_rankings_match_the_model(any_world: World, seed: int) -> None:
    world = any_world
    rng = random.Random(seed)
    model = Model(world)
    await world.seed()
    for _ in range(25):
        action = rng.random()
        if action < 0.5:
            for _ in range(rng.randint(1, 8)):
                # Skewed popularity, so the rankings have leaders and ties both.
                await model.view(CONTENTS[min(int(rng.expovariate(0.4)), len(CONTENTS) - 1)])
        elif action < 0.7:
            world.clock.advance(rng.randint(60, 14 * 3600))
        elif action < 0.85:
            await world.sync(batch_contents=rng.choice([2, 4, 50])).run()
        else:
            hook = Hook()
            hook.crash_at(rng.choice(STEPS), 1)
            with contextlib.suppress(InjectedCrash):
                await world.sync(on_step=hook).run()
        await model.check(rng)
    await world.sync().run()
    await world.check_settled()
    await model.check(rng)
