"""A viewer's sessions are one hash, a field per content (record_views.lua): the rules decide as
they did with a key per (viewer, content), fields no rule can use are pruned as the hash grows and
never one a rule still needs, the hash outlives its longest-lived field, and the per-pair hashes
of earlier versions keep deciding until they expire, then move into the viewer's hash."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import GENEROUS_DEADLINES, NOON_UTC, FakeClock
from tests.test_record_batches import RulesModel
from viewmw import BlockReason, Limits, Settings, ViewTracker
from viewmw.calendar_day import calendar_day
from viewmw.keys import KeySchema
from viewmw.outage.outbox import OutboxEvent

DAY = 86_400
KEYS = KeySchema()
# The daily limit off, so that one viewer can hold many contents' sessions.
MANY = Limits(
    max_views_per_session=2,
    session_seconds=3600,
    max_daily_views_per_user=None,
    one_view_per_day=True,
    view_cooldown_seconds=300,
)


def tracker_on(redis: aioredis.Redis, clock: FakeClock, limits: Limits) -> ViewTracker:
    return ViewTracker(
        redis, None, Settings(limits=limits, **GENEROUS_DEADLINES), clock=clock, pipelining=False
    )


async def fields(redis: aioredis.Redis, viewer: str) -> list[bytes]:
    """The contents of a viewer's session hash (without its prune mark)."""
    return sorted(field for field in await redis.hkeys(KEYS.sessions(viewer)) if field != b"~")


async def test_expired_fields_are_pruned_at_the_prune_mark_and_live_ones_kept(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    # A one-hour session: a field lives to the end of its day and the hour of grace.
    tracker = tracker_on(any_redis, clock, Limits(session_seconds=3600))
    key = KEYS.sessions("user:1")
    clock.now += DAY - clock.now % DAY + 1800  # 00:30 UTC
    for content_id in range(15):
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    clock.advance(24 * 3600 + 900)  # 00:45 the next day: every field lives until 01:00
    assert (await tracker.track_view("story", 100, "user:1")).counted  # the 16th: prunes
    assert len(await fields(any_redis, "user:1")) == 16
    assert await any_redis.hget(key, "~") == b"32"  # nothing expired: the mark doubles

    clock.advance(3600 + 900)  # 02:00: the fifteen of yesterday expired
    for content_id in range(200, 215):  # the 15th brings the hash to its mark
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    assert await fields(any_redis, "user:1") == sorted(
        f"story:{content_id}".encode() for content_id in [100, *range(200, 215)]
    )
    assert await any_redis.hget(key, "~") == b"32"


async def test_an_expired_field_is_no_session_though_not_pruned_yet(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    limits = Limits(max_views_per_session=1, session_seconds=7 * DAY, one_view_per_day=False)
    tracker = tracker_on(any_redis, clock, limits)
    assert (await tracker.track_view("story", 1, "user:1")).counted
    clock.advance(DAY)
    blocked = await tracker.track_view("story", 1, "user:1")
    assert (blocked.counted, blocked.reason) == (False, BlockReason.SESSION_LIMIT)
    # The same session, as if it had been written long ago: it expired a second ago.
    start = int(clock()) - DAY
    await any_redis.hset(KEYS.sessions("user:1"), "story:1", f"1:{start}:0:{DAY - 1}")
    assert (await tracker.track_view("story", 1, "user:1")).counted


async def test_a_replayed_view_keeps_its_session_however_old_it_is(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    """A view made yesterday and replayed today is written today: pruning by today's views
    leaves it, so the next replayed view of the same day is still "viewed today"."""
    tracker = tracker_on(any_redis, clock, Limits(max_daily_views_per_user=None))
    clock.now += DAY - clock.now % DAY + 9 * 3600  # 09:00
    for content_id in range(14):
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    first = OutboxEvent.new("story", "70", "user:1", clock() + 3600)
    second = OutboxEvent.new("story", "70", "user:1", clock() + 4200)
    clock.advance(DAY + 7 * 3600)  # 16:00 the next day: the fourteen sessions expired
    assert await tracker.replay([first]) == [True]
    assert (await tracker.track_view("story", 100, "user:1")).counted  # the 16th: prunes
    assert await fields(any_redis, "user:1") == [b"story:100", b"story:70"]
    assert await tracker.replay([second]) == [False]  # viewed story:70 that day already


async def test_a_replayed_view_never_shortens_what_a_live_view_needs(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    """With a one-hour session a view at 09:00 is remembered to the end of its day; a view of
    23:59 the day before, replayed at 10:00, needs two hours: the later expiry stands."""
    tracker = tracker_on(any_redis, clock, Limits(session_seconds=3600))
    clock.now += DAY - clock.now % DAY + 9 * 3600  # 09:00
    assert (await tracker.track_view("story", 1, "user:1")).counted
    clock.advance(3600)
    late = OutboxEvent.new("story", "1", "user:1", clock() - 10 * 3600 - 60)  # 23:59 yesterday
    assert await tracker.replay([late]) == [True]
    clock.advance(3 * 3600)  # 13:00
    again = await tracker.track_view("story", 1, "user:1")
    assert (again.counted, again.reason) == (False, BlockReason.VIEWED_TODAY)


@dataclass
class ExpiringSessions:
    """The rules with a key per (viewer, content) that expires as the per-pair hashes did: its
    TTL (the session window or cooldown, or the rest of the view's day, and the hour of grace)
    counted from when it was written, never lowered; a replayed view is written at the replay."""

    limits: Limits
    zone: ZoneInfo
    sessions: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    pending: Counter[int] = field(default_factory=Counter)

    def offer(self, now: int, written: int, viewer: int, content: int) -> BlockReason | None:
        limits = self.limits
        day = calendar_day(now, self.zone)
        views, start, last, expiry = self.sessions.get((viewer, content), (0, None, None, 0))
        if written >= expiry:
            views, start, last, expiry = 0, None, None, 0
        if start is None or now - start >= limits.session_seconds:
            views, start = 0, now
        cooldown = limits.view_cooldown_seconds or 0
        if cooldown and last is not None and abs(now - last) < cooldown:
            return BlockReason.COOLDOWN
        if limits.one_view_per_day and last is not None and last in day:
            return BlockReason.VIEWED_TODAY
        if limits.max_views_per_session and views >= limits.max_views_per_session:
            return BlockReason.SESSION_LIMIT
        ttl = max(limits.session_seconds, cooldown, day.end - now) + 3600
        self.sessions[viewer, content] = (
            views + 1,
            start,
            max(now, last if last is not None else now),
            max(expiry, written + ttl),
        )
        self.pending[content] += 1
        return None


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    traffic=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 299, 300, 3600, 5000, 20_000, DAY, 2 * DAY]),
            st.sampled_from([None, None, 60, 3600, 20_000, 40_000, DAY]),
            st.integers(0, 1),
            st.integers(0, 19),
        ),
        min_size=30,
        max_size=120,
    ),
    zone=st.sampled_from(["UTC", "America/New_York", "Australia/Lord_Howe"]),
)
async def test_live_and_replayed_views_are_decided_as_with_a_key_per_pair(
    any_redis: aioredis.Redis, traffic: list[tuple[int, int | None, int, int]], zone: str
) -> None:
    """Views now and views replayed from an outage (made up to two days before), many contents
    per viewer: every decision is the one keys of their own would have given, pruning or not."""
    await any_redis.flushdb()
    clock = FakeClock(now=NOON_UTC)
    limits = Limits(
        max_views_per_session=2,
        session_seconds=3600,
        max_daily_views_per_user=None,
        view_cooldown_seconds=300,
    )
    tracker = ViewTracker(
        any_redis,
        None,
        Settings(limits=limits, timezone=zone, **GENEROUS_DEADLINES),
        clock=clock,
        pipelining=False,
    )
    model = ExpiringSessions(limits, ZoneInfo(zone))
    for step, age, viewer, content in traffic:
        clock.advance(step)
        now = int(clock.now)
        if age is None:
            result = await tracker.track_view("story", content, f"user:{viewer}")
            assert result.reason == model.offer(now, now, viewer, content)
        else:
            event = OutboxEvent.new("story", str(content), f"user:{viewer}", now - age)
            counted = model.offer(now - age, now, viewer, content) is None
            assert await tracker.replay([event]) == [counted]
    for content, counted in model.pending.items():
        assert await any_redis.get(KEYS.pending("story", str(content))) == str(counted).encode()


@pytest.mark.parametrize("replayed_first", [True, False])
async def test_the_hash_lives_as_long_as_its_longest_lived_field(
    any_redis: aioredis.Redis, clock: FakeClock, replayed_first: bool
) -> None:
    """A one-hour session at 23:00 needs two hours; a view of 00:30 replayed then needs the
    rest of its day, 23.5 h, and an hour: in either order the hash lives that long."""
    tracker = tracker_on(any_redis, clock, Limits(session_seconds=3600))
    clock.now += DAY - clock.now % DAY + 23 * 3600  # 23:00
    early = OutboxEvent.new("story", "1", "user:1", clock() - 22.5 * 3600)
    if replayed_first:
        assert await tracker.replay([early]) == [True]
    assert (await tracker.track_view("story", 2, "user:1")).counted
    if not replayed_first:
        assert await tracker.replay([early]) == [True]
    assert await fields(any_redis, "user:1") == [b"story:1", b"story:2"]
    assert await any_redis.ttl(KEYS.sessions("user:1")) >= 24.5 * 3600 - 60


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    traffic=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 299, 300, 3600, 5000, 20_000, DAY, 2 * DAY]),
            st.integers(0, 1),
            st.integers(0, 24),
        ),
        min_size=1,
        max_size=150,
    ),
)
async def test_pruning_never_changes_a_decision(
    any_redis: aioredis.Redis, traffic: list[tuple[int, int, int]]
) -> None:
    await any_redis.flushdb()
    clock = FakeClock(now=NOON_UTC)
    tracker = tracker_on(any_redis, clock, MANY)
    model = RulesModel(MANY, ZoneInfo("UTC"))  # keeps every session forever
    for step, viewer, content in traffic:
        clock.advance(step)
        expected = model.offer(int(clock.now), viewer, content)
        result = await tracker.track_view("story", content, f"user:{viewer}")
        assert result.reason == expected
    for content, counted in model.pending.items():
        assert await any_redis.get(KEYS.pending("story", str(content))) == str(counted).encode()


async def _pair_session(
    redis: aioredis.Redis, viewer: str, content_id: int, views: int, start: float, last: float
) -> None:
    """A session as versions with one hash per (viewer, content) wrote it."""
    key = KEYS.pair_session(viewer, "story", str(content_id))
    await redis.hset(key, mapping={"n": views, "s": int(start), "l": int(last)})
    await redis.expire(key, DAY)


LIMITS = Limits(
    max_views_per_session=2,
    max_daily_views_per_user=None,
    one_view_per_day=False,
    view_cooldown_seconds=300,
)


async def test_a_session_of_the_per_pair_layout_decides_then_moves_into_the_viewers_hash(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    tracker = tracker_on(any_redis, clock, LIMITS)
    start = clock() - 60
    await _pair_session(any_redis, "user:1", 7, 1, start, start)

    result = await tracker.track_view("story", 7, "user:1")
    assert (result.counted, result.reason) == (False, BlockReason.COOLDOWN)
    assert await any_redis.exists(KEYS.pair_session("user:1", "story", "7"))

    clock.advance(240)  # 300 s after the last counted view: the second view of its session
    assert (await tracker.track_view("story", 7, "user:1")).counted
    assert not await any_redis.exists(KEYS.pair_session("user:1", "story", "7"))
    session = await any_redis.hget(KEYS.sessions("user:1"), "story:7")
    assert session is not None and session.startswith(f"2:{int(start)}:300:".encode())

    clock.advance(300)
    result = await tracker.track_view("story", 7, "user:1")
    assert (result.counted, result.reason) == (False, BlockReason.SESSION_LIMIT)


async def test_the_more_recent_of_the_two_layouts_decides(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    tracker = tracker_on(any_redis, clock, LIMITS)
    now = clock()
    # Content 1: the per-pair hash is more recent (a process of the earlier version counted the
    # view last, during a rolling upgrade); content 2: the viewer's hash is.
    await any_redis.hset(KEYS.sessions("user:1"), "story:1", f"2:{int(now - 1000)}:0:{DAY}")
    await _pair_session(any_redis, "user:1", 1, 1, now - 400, now - 400)
    await any_redis.hset(KEYS.sessions("user:1"), "story:2", f"1:{int(now - 400)}:0:{DAY}")
    await _pair_session(any_redis, "user:1", 2, 2, now - 1000, now - 1000)
    await any_redis.expire(KEYS.sessions("user:1"), DAY)

    assert (await tracker.track_view("story", 1, "user:1")).counted  # its session: 1 view
    assert (await tracker.track_view("story", 2, "user:1")).counted  # its session: 1 view
    clock.advance(300)
    for content_id in (1, 2):  # both now at the session limit, in the viewer's hash alone
        result = await tracker.track_view("story", content_id, "user:1")
        assert (result.counted, result.reason) == (False, BlockReason.SESSION_LIMIT)
    assert await any_redis.exists(KEYS.pair_session("user:1", "story", "1")) == 0
    assert await any_redis.exists(KEYS.pair_session("user:1", "story", "2")) == 0


async def test_an_unreadable_field_is_a_new_session_and_is_rewritten(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    tracker = tracker_on(any_redis, clock, LIMITS)
    await any_redis.hset(KEYS.sessions("user:1"), "story:1", "not a session")
    assert (await tracker.track_view("story", 1, "user:1")).counted
    session = await any_redis.hget(KEYS.sessions("user:1"), "story:1")
    ttl = 24 * 3600 + 3600  # the session window (a day) and the hour of grace
    assert session == f"1:{int(clock())}:0:{ttl}".encode()
