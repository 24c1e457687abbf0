"""A viewer's sessions are one hash, a field per content (record_views.lua): the rules decide as
they did with a key per (viewer, content), fields no rule can use are pruned as the hash grows and
never one a rule still needs, the hash outlives its longest-lived field, and the per-pair hashes
of earlier versions keep deciding until they expire, then move into the viewer's hash."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import GENEROUS_DEADLINES, NOON_UTC, FakeClock
from tests.test_record_batches import RulesModel
from viewmw import BlockReason, Limits, Settings, ViewTracker
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
    return sorted(await redis.hkeys(KEYS.sessions(viewer)))


async def test_fields_no_rule_can_use_are_pruned_and_live_ones_kept(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    # A one-hour session: "viewed today" is what keeps a field for the rest of its day.
    limits = Limits(session_seconds=3600, max_daily_views_per_user=None)
    tracker = tracker_on(any_redis, clock, limits)
    for content_id in range(15):
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    assert len(await fields(any_redis, "user:1")) == 15
    clock.advance(2 * DAY)  # past the session window, the day and the hour of grace
    # The 16th field prunes: only the new one is left.
    assert (await tracker.track_view("story", 100, "user:1")).counted
    assert await fields(any_redis, "user:1") == [b"story:100"]

    clock.now += DAY - clock.now % DAY + 1800  # 00:30 UTC, the next day
    for content_id in range(200, 214):
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    clock.advance(23 * 3600)  # 23:30: every field of today still needed ("viewed today")
    # The 16th field prunes again: story:100 (35 h old) goes, the fields of today stay.
    assert (await tracker.track_view("story", 300, "user:1")).counted
    assert await fields(any_redis, "user:1") == sorted(
        f"story:{content_id}".encode() for content_id in [*range(200, 214), 300]
    )
    for content_id in (200, 213):
        result = await tracker.track_view("story", content_id, "user:1")
        assert (result.counted, result.reason) == (False, BlockReason.VIEWED_TODAY)
    clock.advance(1800)  # the next day
    for content_id in (200, 213):
        assert (await tracker.track_view("story", content_id, "user:1")).counted


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


async def test_the_hash_lives_as_long_as_its_longest_lived_field(
    any_redis: aioredis.Redis, clock: FakeClock
) -> None:
    limits = Limits(session_seconds=3600, max_daily_views_per_user=None)
    tracker = tracker_on(any_redis, clock, limits)
    assert (await tracker.track_view("story", 1, "user:1")).counted  # noon: lives past midnight
    before = await any_redis.ttl(KEYS.sessions("user:1"))
    assert before > 12 * 3600
    # A view replayed from an outage, made late yesterday, needs far less: the hash keeps its TTL.
    late_yesterday = OutboxEvent.new("story", "2", "user:1", clock() - 13 * 3600)
    assert await tracker.replay([late_yesterday]) == [True]
    assert await fields(any_redis, "user:1") == [b"story:1", b"story:2"]
    assert await any_redis.ttl(KEYS.sessions("user:1")) >= before - 5


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
    assert session == f"2:{int(start)}:300".encode()

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
    await any_redis.hset(KEYS.sessions("user:1"), "story:1", f"2:{int(now - 1000)}:0")
    await _pair_session(any_redis, "user:1", 1, 1, now - 400, now - 400)
    await any_redis.hset(KEYS.sessions("user:1"), "story:2", f"1:{int(now - 400)}:0")
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
    assert session == f"1:{int(clock())}:0".encode()
