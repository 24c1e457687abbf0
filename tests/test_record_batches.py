"""One ``record_views`` call for a batch decides exactly as one call per view, and both agree with
a plain-Python model of the rules, on random traffic."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as dt_time
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import GENEROUS_DEADLINES, NOON_UTC, FakeClock
from viewmw import BlockReason, Limits, Settings, ViewTracker

LIMITS = Limits(
    max_views_per_session=2,
    session_seconds=3600,
    max_daily_views_per_user=3,
    one_view_per_day=False,
    view_cooldown_seconds=300,
)
ZONE = "Asia/Tokyo"
STEPS = st.sampled_from([0, 1, 60, 299, 300, 301, 1800, 3599, 3600, 20_000, 86_400])
VIEW = st.tuples(STEPS, st.integers(0, 2), st.integers(0, 3), st.integers(1, 4))
# (seconds since the previous view, viewer, content, size of the batch it starts)


@dataclass
class RulesModel:
    """The rules of docs/counting.md, written plainly."""

    limits: Limits
    zone: ZoneInfo
    sessions: dict[tuple[int, int], tuple[int, int | None, int | None]] = field(
        default_factory=dict
    )
    daily: Counter[tuple[int, str]] = field(default_factory=Counter)
    pending: Counter[int] = field(default_factory=Counter)

    def offer(self, now: int, viewer: int, content: int) -> BlockReason | None:
        limits = self.limits
        local = datetime.fromtimestamp(now, self.zone).date()
        day_start = datetime.combine(local, dt_time(), self.zone).timestamp()
        day_end = datetime.combine(local + timedelta(days=1), dt_time(), self.zone).timestamp()
        views, start, last = self.sessions.get((viewer, content), (0, None, None))
        if start is None or now - start >= limits.session_seconds:
            views, start = 0, now
        cooldown = limits.view_cooldown_seconds or 0
        if cooldown and last is not None and abs(now - last) < cooldown:
            return BlockReason.COOLDOWN
        if limits.one_view_per_day and last is not None and day_start <= last < day_end:
            return BlockReason.VIEWED_TODAY
        if limits.max_views_per_session and views >= limits.max_views_per_session:
            return BlockReason.SESSION_LIMIT
        day = local.isoformat()
        if (
            limits.max_daily_views_per_user
            and self.daily[viewer, day] >= limits.max_daily_views_per_user
        ):
            return BlockReason.DAILY_LIMIT
        self.sessions[viewer, content] = (views + 1, start, max(now, last or now))
        if limits.max_daily_views_per_user:
            self.daily[viewer, day] += 1
        self.pending[content] += 1
        return None


async def run_both(
    redis: aioredis.Redis, traffic: list[tuple[int, int, int, int]], limits: Limits
) -> None:
    await redis.flushdb()
    clock = FakeClock(now=NOON_UTC)
    one_by_one = ViewTracker(
        redis,
        None,
        Settings(limits=limits, timezone=ZONE, key_prefix="single:", **GENEROUS_DEADLINES),
        clock=clock,
        pipelining=False,
    )
    batched = ViewTracker(
        redis,
        None,
        Settings(limits=limits, timezone=ZONE, key_prefix="batch:", **GENEROUS_DEADLINES),
    )
    model = RulesModel(limits, ZoneInfo(ZONE))
    views, batches = [], []
    now = int(NOON_UTC)
    for step, viewer, content, size in traffic:
        now += step
        views.append((now, viewer, content))
        if len(batches) == 0 or len(batches[-1]) >= batches[-1][0]:
            batches.append([size])
        batches[-1].append(len(views) - 1)
    expected = [model.offer(now, viewer, content) for now, viewer, content in views]

    singles = []
    for now, viewer, content in views:
        clock.now = now
        result = await one_by_one.track_view("story", content, f"user:{viewer}")
        singles.append(result.reason if not result.counted else None)
        assert result.counted == (result.reason is None)

    in_batches: list[BlockReason | None] = []
    for batch in batches:
        calls = [
            batched._view_call("story", str(views[n][2]), f"user:{views[n][1]}", views[n][0])
            for n in batch[1:]
        ]
        replies = await batched._send_views(calls)
        for counted, reason, *_ in replies:
            in_batches.append(None if counted == 1 else BlockReason(_REASON_NAMES[reason]))

    assert singles == expected
    assert in_batches == expected
    for content, counted in model.pending.items():
        assert await redis.get(f"single:story:views:{content}") == str(counted).encode()
        assert await redis.get(f"batch:story:views:{content}") == str(counted).encode()


_REASON_NAMES = {1: "cooldown", 2: "viewed_today", 3: "session_limit", 4: "daily_limit"}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(traffic=st.lists(VIEW, min_size=1, max_size=40), one_per_day=st.booleans())
async def test_a_batch_decides_as_one_call_per_view_and_as_the_rules_say(
    any_redis: aioredis.Redis, traffic: list[tuple[int, int, int, int]], one_per_day: bool
) -> None:
    limits = Limits(
        max_views_per_session=LIMITS.max_views_per_session,
        session_seconds=LIMITS.session_seconds,
        max_daily_views_per_user=LIMITS.max_daily_views_per_user,
        one_view_per_day=one_per_day,
        view_cooldown_seconds=LIMITS.view_cooldown_seconds,
    )
    await run_both(any_redis, traffic, limits)
