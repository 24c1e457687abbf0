"""The abuse rules: each alone, all together, their order, calendar days, and what a block costs.

Time only moves through the injected :class:`FakeClock`; nothing sleeps. Each test runs on the
real Redis, on fakeredis (the embedded stand-in) and on a real local Redis Cluster (keys spread
over content shards, the daily limit reserved in the viewer's shard) unless it says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.support import NOON_UTC, FakeClock
from viewmw import BlockReason, KeySchema, Limits, Settings, Store, ViewTracker
from viewmw.node_connections import NodeConnections

COOLDOWN = BlockReason.COOLDOWN
VIEWED_TODAY = BlockReason.VIEWED_TODAY
SESSION_LIMIT = BlockReason.SESSION_LIMIT
DAILY_LIMIT = BlockReason.DAILY_LIMIT
COUNTED = None  # the reason of a counted view

HOUR = 3600.0
DAY = 24 * HOUR

ALL_OFF: dict[str, Any] = {
    "max_views_per_session": None,
    "max_daily_views_per_user": None,
    "one_view_per_day": False,
    "view_cooldown_seconds": None,
}


def only(**rules: Any) -> Limits:
    """Limits with every rule off except the ones given."""
    return Limits(**{**ALL_OFF, **rules})


MakeTracker = Callable[..., ViewTracker]


@pytest.fixture(params=["redis", "fakeredis", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> aioredis.Redis:
    """conftest's ``any_redis``, as a plain fixture: the async one in conftest cannot set up an
    async fixture from inside the running loop (``Runner.run() cannot be called from a running
    event loop``). Remove this once conftest's is a plain ``def``. ``cluster`` is a client of
    the local Redis Cluster, every primary flushed (typed as a Redis: it answers the same
    commands, a key's slot aside)."""
    name = {"redis": "real_redis", "fakeredis": "fake_redis", "cluster": "cluster_redis"}
    return request.getfixturevalue(name[request.param])  # type: ignore[no-any-return]


def _redis_url(redis: Any) -> str | None:
    """The cluster URL a tracker on ``redis`` needs to shard its keys (``None``: one Redis)."""
    if not isinstance(redis, RedisCluster):
        return None
    nodes = ",".join(f"{node.host}:{node.port}" for node in redis.get_primaries())
    return f"redis+cluster://{nodes}"


def keys_of(redis: Any, kind: str = "story", content_id: str | int = 7) -> KeySchema:
    """The key schema of one content's keys on ``redis`` (its shard's, on a cluster)."""
    url = _redis_url(redis)
    return Settings(redis_url=url).content_shards().of(kind, str(content_id))


async def daily_views(redis: Any, viewer: str, day: str) -> int | None:
    """A viewer's counted views of a day as the daily limit holds them: the counter on a single
    Redis, the places held in the viewer's quota on a cluster (``None``: nothing held)."""
    keys = keys_of(redis)
    key = keys.daily_views(viewer, day)
    value = await (redis.get(key) if keys.shard is None else redis.hget(key, "n"))
    return None if value is None else int(value)


@pytest.fixture
async def node_connections(any_redis: aioredis.Redis) -> AsyncIterator[NodeConnections | None]:
    """On the cluster, the lean connections per primary that a tracker built from settings
    sends its views on (viewmw.node_connections); ``None`` on a single Redis."""
    if not isinstance(any_redis, RedisCluster):
        yield None
        return
    connections = NodeConnections(any_redis)
    yield connections
    await connections.aclose()


@pytest.fixture
def make_tracker(
    any_redis: aioredis.Redis, node_connections: NodeConnections | None, clock: FakeClock
) -> MakeTracker:
    """Trackers sharing one Redis and one clock, with any limits and time zone; no database."""

    def make(limits: Limits | None = None, timezone: str = "UTC") -> ViewTracker:
        # A generous deadline (as conftest's settings): a busy machine must not turn a reply
        # into a late one, least of all on a cluster, where a view takes two calls.
        settings = Settings(
            limits=limits or Limits(),
            timezone=timezone,
            redis_url=_redis_url(any_redis),
            redis_timeout=5.0,
        )
        return ViewTracker(
            any_redis, None, settings, clock=clock, script_connection=node_connections
        )

    return make


async def outcome(
    tracker: ViewTracker, content_id: str | int = 7, viewer: str = "user:1", kind: str = "story"
) -> BlockReason | None:
    """Offer one view; return ``None`` if it was counted, else the reason it was blocked."""
    result = await tracker.track_view(kind, content_id, viewer)
    assert result.counted is (result.reason is None)
    return result.reason


async def pending(redis: aioredis.Redis, content_id: str | int = 7, kind: str = "story") -> int:
    return int(
        await redis.get(keys_of(redis, kind, content_id).pending(kind, str(content_id))) or 0
    )


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: float = 0) -> float:
    """A UTC instant as seconds since the epoch."""
    whole = datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()
    return whole + second


# Each rule alone -------------------------------------------------------------------------------


async def test_session_limit_three_views_per_24h_window_then_a_new_session(
    make_tracker: MakeTracker, clock: FakeClock, any_redis: aioredis.Redis
) -> None:
    tracker = make_tracker(only(max_views_per_session=3))  # session window: the default 24 h
    start = clock.now
    assert [await outcome(tracker) for _ in range(3)] == [COUNTED] * 3
    assert await outcome(tracker) == SESSION_LIMIT

    clock.now = start + 23 * HOUR
    assert await outcome(tracker) == SESSION_LIMIT
    clock.now = start + DAY - 0.001
    assert await outcome(tracker) == SESSION_LIMIT

    clock.now = start + DAY  # the window is [start, start + 24 h): a new session begins
    assert [await outcome(tracker) for _ in range(4)] == [COUNTED] * 3 + [SESSION_LIMIT]
    assert await pending(any_redis) == 6
    # The new session began at its first view (start + 24 h), so it ends 24 h after that.
    clock.now = start + 2 * DAY - 0.001
    assert await outcome(tracker) == SESSION_LIMIT
    clock.now = start + 2 * DAY
    assert await outcome(tracker) == COUNTED

    # Another viewer and another content have sessions of their own.
    assert await outcome(tracker, viewer="user:2") == COUNTED
    assert await outcome(tracker, content_id=8) == COUNTED


async def test_session_starts_at_first_counted_view_not_at_a_blocked_attempt(
    make_tracker: MakeTracker, clock: FakeClock
) -> None:
    tracker = make_tracker(
        Limits(**{**ALL_OFF, "max_views_per_session": 1, "session_seconds": 100})
    )
    t0 = clock.now
    assert await outcome(tracker) == COUNTED
    clock.now = t0 + 50
    assert await outcome(tracker) == SESSION_LIMIT
    # Had the attempt at t0 + 50 started a session, this would be blocked until t0 + 150.
    clock.now = t0 + 120  # the first session ended at t0 + 100; this view starts a new one
    assert await outcome(tracker) == COUNTED
    clock.now = t0 + 150
    assert await outcome(tracker) == SESSION_LIMIT
    # The new session is [t0 + 120, t0 + 220): not [t0 + 100, t0 + 200) (the old end) ...
    clock.now = t0 + 219.999
    assert await outcome(tracker) == SESSION_LIMIT
    # ... and not [t0 + 150, ...) (the blocked attempt).
    clock.now = t0 + 220
    assert await outcome(tracker) == COUNTED


async def test_cooldown_blocks_until_exactly_300_seconds_after_the_last_counted_view(
    make_tracker: MakeTracker, clock: FakeClock, any_redis: aioredis.Redis
) -> None:
    tracker = make_tracker(only(view_cooldown_seconds=300))
    t0 = clock.now
    assert await outcome(tracker) == COUNTED
    for offset in (0, 1, 100, 299, 299.999):
        clock.now = t0 + offset
        assert await outcome(tracker) == COOLDOWN, offset
    clock.now = t0 + 300
    assert await outcome(tracker) == COUNTED
    # Measured from the last *counted* view: the blocked attempts above did not restart it.
    clock.now = t0 + 300 + 299.999
    assert await outcome(tracker) == COOLDOWN
    clock.now = t0 + 600
    assert await outcome(tracker) == COUNTED
    assert await pending(any_redis) == 3
    # Per (viewer, content): others are not cooled down.
    assert await outcome(tracker, viewer="user:2") == COUNTED
    assert await outcome(tracker, content_id=8) == COUNTED


async def test_one_view_per_day_resets_at_utc_midnight_by_default(
    make_tracker: MakeTracker, clock: FakeClock
) -> None:
    tracker = make_tracker(only(one_view_per_day=True))
    assert await outcome(tracker) == COUNTED  # 2025-11-24 12:00 UTC
    clock.now = at(2025, 11, 24, 23, 59, 59.999)
    assert await outcome(tracker) == VIEWED_TODAY
    clock.now = at(2025, 11, 25)
    assert await outcome(tracker) == COUNTED
    assert await outcome(tracker) == VIEWED_TODAY
    assert await outcome(tracker, content_id=8) == COUNTED  # per content
    assert await outcome(tracker, viewer="user:2") == COUNTED  # per viewer


@pytest.mark.parametrize(
    ("timezone", "last_local_instant", "local_midnight", "utc_midnight_same_day"),
    [
        # Tokyo (UTC+9): the local day ends at 15:00 UTC, before UTC's does.
        ("Asia/Tokyo", at(2025, 11, 24, 14, 59, 59.999), at(2025, 11, 24, 15), False),
        # New York (UTC-5 in November): UTC's midnight falls at 19:00 local, the same local day.
        ("America/New_York", at(2025, 11, 25, 4, 59, 59.999), at(2025, 11, 25, 5), True),
    ],
)
async def test_one_view_per_day_resets_at_local_midnight_not_utc_midnight(
    make_tracker: MakeTracker,
    clock: FakeClock,
    timezone: str,
    last_local_instant: float,
    local_midnight: float,
    utc_midnight_same_day: bool,
) -> None:
    tracker = make_tracker(only(one_view_per_day=True), timezone)
    clock.now = NOON_UTC  # 21:00 in Tokyo, 07:00 in New York, on 2025-11-24 locally
    assert await outcome(tracker) == COUNTED
    if utc_midnight_same_day:
        clock.now = at(2025, 11, 25, 0, 0, 1)  # a new UTC day, still 2025-11-24 in New York
        assert await outcome(tracker) == VIEWED_TODAY
    clock.now = last_local_instant
    assert await outcome(tracker) == VIEWED_TODAY
    clock.now = local_midnight
    assert await outcome(tracker) == COUNTED
    if not utc_midnight_same_day:
        clock.now = at(2025, 11, 25, 0, 0, 1)  # UTC's midnight is no boundary in Tokyo
        assert await outcome(tracker) == VIEWED_TODAY


async def test_calendar_day_follows_daylight_saving_time(
    make_tracker: MakeTracker, clock: FakeClock
) -> None:
    # 2026-03-08 is 23 hours long in New York: its midnight is 05:00 UTC, the next one 04:00 UTC.
    tracker = make_tracker(only(one_view_per_day=True), "America/New_York")
    clock.now = at(2026, 3, 8, 5)
    assert await outcome(tracker) == COUNTED
    clock.now = at(2026, 3, 9, 3, 59, 59.999)
    assert await outcome(tracker) == VIEWED_TODAY
    clock.now = at(2026, 3, 9, 4)
    assert await outcome(tracker) == COUNTED


async def test_daily_limit_is_100_distinct_contents_per_viewer_across_types(
    make_tracker: MakeTracker, any_redis: aioredis.Redis
) -> None:
    tracker = make_tracker()  # the defaults: 100 a day
    assert Limits().max_daily_views_per_user == 100
    for n in range(50):
        assert await outcome(tracker, content_id=n, kind="story") == COUNTED
        assert await outcome(tracker, content_id=n, kind="task") == COUNTED
    assert await outcome(tracker, content_id=100) == DAILY_LIMIT  # the 101st distinct content
    assert await outcome(tracker, content_id=100, kind="task") == DAILY_LIMIT
    assert await pending(any_redis, 100) == 0
    assert await daily_views(any_redis, "user:1", "2025-11-24") == 100
    assert await outcome(tracker, content_id=100, viewer="user:2") == COUNTED  # per viewer


async def test_daily_limit_resets_at_local_midnight(
    make_tracker: MakeTracker, clock: FakeClock
) -> None:
    tracker = make_tracker(only(max_daily_views_per_user=2), "Asia/Tokyo")
    assert [await outcome(tracker, content_id=n) for n in (1, 2, 3)] == [
        COUNTED,
        COUNTED,
        DAILY_LIMIT,
    ]
    clock.now = at(2025, 11, 24, 14, 59, 59.999)  # 23:59:59.999 in Tokyo
    assert await outcome(tracker, content_id=3) == DAILY_LIMIT
    clock.now = at(2025, 11, 24, 15)  # midnight in Tokyo, 15:00 the same day in UTC
    assert [await outcome(tracker, content_id=n) for n in (3, 4, 5)] == [
        COUNTED,
        COUNTED,
        DAILY_LIMIT,
    ]


# Disabling ----------------------------------------------------------------------------------------


BLOCKING_ALONE = {
    "max_views_per_session": (1, SESSION_LIMIT),
    "max_daily_views_per_user": (1, DAILY_LIMIT),
    "one_view_per_day": (True, VIEWED_TODAY),
    "view_cooldown_seconds": (300, COOLDOWN),
}


async def _same_instant_views(tracker: ViewTracker, rule: str) -> list[BlockReason | None]:
    """Five views at one instant: of one content, or of five contents for the daily limit."""
    if rule == "max_daily_views_per_user":
        return [await outcome(tracker, content_id=n) for n in range(5)]
    return [await outcome(tracker) for _ in range(5)]


@pytest.mark.parametrize("rule", sorted(BLOCKING_ALONE))
async def test_each_rule_alone_blocks_with_its_reason(make_tracker: MakeTracker, rule: str) -> None:
    value, reason = BLOCKING_ALONE[rule]
    outcomes = await _same_instant_views(make_tracker(only(**{rule: value})), rule)
    assert outcomes == [COUNTED] + [reason] * 4


# Each case: a rule, the other limits (the defaults unless given), views as (seconds after the
# start, content id), and their outcomes with the rule on. With the rule off, all of them count.
DISABLE_CASES: dict[str, tuple[dict[str, Any], list[tuple[float, int]], list[Any]]] = {
    "max_views_per_session": (
        {"max_views_per_session": 3, "session_seconds": int(10 * DAY)},
        [(d * DAY, 7) for d in range(5)],  # one a day: neither cooldown nor one-per-day block
        [COUNTED] * 3 + [SESSION_LIMIT] * 2,
    ),
    "max_daily_views_per_user": (
        {"max_daily_views_per_user": 3},
        [(0, n) for n in range(5)],
        [COUNTED] * 3 + [DAILY_LIMIT] * 2,
    ),
    "view_cooldown_seconds": (
        {"view_cooldown_seconds": 300, "one_view_per_day": False},
        [(0, 7), (1, 7), (299, 7)],
        [COUNTED, COOLDOWN, COOLDOWN],
    ),
    "one_view_per_day": (
        {"one_view_per_day": True},
        [(0, 7), (300, 7), (600, 7)],
        [COUNTED, VIEWED_TODAY, VIEWED_TODAY],
    ),
}


@pytest.mark.parametrize(
    ("rule", "off"),
    [
        ("max_views_per_session", 0),
        ("max_views_per_session", None),
        ("max_daily_views_per_user", 0),
        ("max_daily_views_per_user", None),
        ("view_cooldown_seconds", 0),
        ("view_cooldown_seconds", None),
        ("one_view_per_day", False),
    ],
)
async def test_a_rule_set_to_0_none_or_false_is_off_while_the_others_stay_on(
    make_tracker: MakeTracker, clock: FakeClock, rule: str, off: Any
) -> None:
    limits, schedule, outcomes_when_on = DISABLE_CASES[rule]
    start = clock.now

    async def run(tracker: ViewTracker, viewer: str) -> list[BlockReason | None]:
        outcomes = []
        for offset, content_id in schedule:
            clock.now = start + offset
            outcomes.append(await outcome(tracker, content_id, viewer))
        return outcomes

    assert await run(make_tracker(Limits(**limits)), "user:1") == outcomes_when_on
    assert await run(make_tracker(Limits(**{**limits, rule: off})), "user:2") == [COUNTED] * len(
        schedule
    )


async def test_all_rules_off_counts_every_view(
    make_tracker: MakeTracker, any_redis: aioredis.Redis
) -> None:
    tracker = make_tracker(
        Limits(
            max_views_per_session=0,
            max_daily_views_per_user=0,
            one_view_per_day=False,
            view_cooldown_seconds=0,
        )
    )
    for _ in range(150):
        assert await outcome(tracker) == COUNTED
    for n in range(150):
        assert await outcome(tracker, content_id=f"c{n}") == COUNTED
    assert await pending(any_redis) == 150
    # No daily counter is kept while the daily limit is off.
    assert await daily_views(any_redis, "user:1", "2025-11-24") is None


# Order -------------------------------------------------------------------------------------------


async def test_reasons_follow_the_documented_order_when_all_rules_apply(
    make_tracker: MakeTracker, clock: FakeClock
) -> None:
    """One state in which all four rules block; switching off the first leaves the next."""
    assert list(BlockReason) == [COOLDOWN, VIEWED_TODAY, SESSION_LIMIT, DAILY_LIMIT]
    every = {
        "view_cooldown_seconds": 300,
        "one_view_per_day": True,
        "max_views_per_session": 1,
        "max_daily_views_per_user": 1,
    }
    assert await outcome(make_tracker(only(**every))) == COUNTED
    clock.advance(1)
    expected = [COOLDOWN, VIEWED_TODAY, SESSION_LIMIT, DAILY_LIMIT, COUNTED]
    rules = list(every)  # in the documented order
    for n, reason in enumerate(expected):
        # The same state and instant, with the first n rules switched off.
        limits = only(**{rule: every[rule] for rule in rules[n:]})
        assert await outcome(make_tracker(limits)) == reason, limits


async def test_all_rules_together_with_default_limits(
    real_redis: aioredis.Redis, pg_store: Store, clock: FakeClock
) -> None:
    """Real Redis and PostgreSQL; defaults except a three-day session window and a daily limit
    of 5, so that every rule gets its turn to block within four days."""
    limits = Limits(session_seconds=3 * 86400, max_daily_views_per_user=5)
    tracker = ViewTracker(
        real_redis, pg_store, Settings(limits=limits, database_request_timeout=30.0), clock=clock
    )
    t0 = clock.now  # day 1, 12:00

    async def view(content_id: int = 7) -> BlockReason | None:
        return await outcome(tracker, content_id)

    assert await view() == COUNTED
    clock.now = t0 + 1
    assert await view() == COOLDOWN  # viewed today too: cooldown comes first
    clock.now = t0 + 300
    assert await view() == VIEWED_TODAY
    clock.now = t0 + DAY  # day 2
    assert await view() == COUNTED
    clock.now = t0 + 2 * DAY  # day 3: the third view of this session
    assert await view() == COUNTED
    clock.now = t0 + 3 * DAY - HOUR  # day 4, still inside the three-day session
    assert await view() == SESSION_LIMIT
    assert [await view(n) for n in (1, 2, 3, 4, 5, 6)] == [COUNTED] * 5 + [DAILY_LIMIT]
    assert await view() == SESSION_LIMIT  # session limit before the daily limit
    assert await view(1) == COOLDOWN  # cooldown before viewed today and the daily limit
    clock.advance(300)
    assert await view(1) == VIEWED_TODAY  # viewed today before the daily limit
    clock.now = t0 + 3 * DAY  # a new session begins, but the day's five views are spent
    assert await view() == DAILY_LIMIT
    clock.now = t0 + 3.5 * DAY  # day 5, 00:00
    assert await view() == COUNTED
    assert await tracker.get_view_count("story", 7) == 4
    assert await tracker.get_view_counts("story", [1, 2, 3, 4, 5, 6]) == {
        "1": 1,
        "2": 1,
        "3": 1,
        "4": 1,
        "5": 1,
        "6": 0,
    }


# A blocked view consumes nothing ------------------------------------------------------------------

TTL_MARK_MS = 7_777_777_000  # far above any TTL viewmw sets, so a refreshed TTL would show


# The per-day history records every view offered (its viewer, why it was blocked) and, so that
# the day's viewers reach the history, marks the content for the sync: none of that is rule state.
_HISTORY_KEY = re.compile(rb"(.*:uniq:.*|.*:days:.*|viewmw:blocked:.*|viewmw:dirty(:\{c:\d+\})?)")


async def redis_state(redis: aioredis.Redis) -> dict[bytes, tuple[bytes, Any, bool]]:
    """Every key but the per-day history's: its type, its value, and whether it has a TTL."""
    state: dict[bytes, tuple[bytes, Any, bool]] = {}
    async for key in redis.scan_iter(count=1000):
        if _HISTORY_KEY.fullmatch(key):
            continue
        kind = await redis.type(key)
        value: Any
        if kind == b"string":
            value = await redis.get(key)
        elif kind == b"hash":
            value = await redis.hgetall(key)
            if key.startswith(b"daily_views:{v:"):
                # A viewer's quota on a cluster: its places held are the rule's state; it also
                # remembers each view it answered (so a replay is answered alike), and a blocked
                # view's place, reserved and given back, leaves such a record.
                value = value.get(b"n")
        elif kind == b"set":
            value = await redis.smembers(key)
        elif kind == b"zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        else:  # pragma: no cover - viewmw writes no other types
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
        state[key] = (kind, value, await redis.pttl(key) != -1)
    return state


async def mark_ttls(redis: aioredis.Redis) -> None:
    async for key in redis.scan_iter(count=1000):
        if await redis.pttl(key) > 0:
            await redis.pexpire(key, TTL_MARK_MS)


async def assert_ttls_untouched(redis: aioredis.Redis) -> None:
    async for key in redis.scan_iter(count=1000):
        if _HISTORY_KEY.fullmatch(key):
            continue
        ttl = await redis.pttl(key)
        assert ttl == -1 or TTL_MARK_MS - 60_000 < ttl <= TTL_MARK_MS, (key, ttl)


@pytest.mark.parametrize("reason", list(BlockReason))
async def test_a_blocked_view_writes_nothing(
    make_tracker: MakeTracker, any_redis: aioredis.Redis, clock: FakeClock, reason: BlockReason
) -> None:
    rule = {
        COOLDOWN: "view_cooldown_seconds",
        VIEWED_TODAY: "one_view_per_day",
        SESSION_LIMIT: "max_views_per_session",
        DAILY_LIMIT: "max_daily_views_per_user",
    }[reason]
    value, _ = BLOCKING_ALONE[rule]
    # The daily limit needs its counter, so it is on (at 1) in every case.
    tracker = make_tracker(only(**{rule: value, "max_daily_views_per_user": 1}))
    assert await outcome(tracker) == COUNTED
    assert await outcome(tracker, content_id=8, viewer="user:2") == COUNTED
    clock.advance(1)
    await tracker.drain()  # on a cluster: the daily places given back after the replies
    before = await redis_state(any_redis)
    keys = keys_of(any_redis)
    assert {key for key, (_, _, has_ttl) in before.items() if has_ttl} >= {
        keys.sessions("user:1").encode(),
        keys.daily_views("user:1", "2025-11-24").encode(),
    }
    await mark_ttls(any_redis)

    blocked_id = 9 if reason == DAILY_LIMIT else 7  # the daily limit blocks any new content
    result = await tracker.track_view("story", blocked_id, "user:1")
    await tracker.drain()

    assert (result.counted, result.reason) == (False, reason)
    assert result.count is not None and result.count.total == (0 if blocked_id == 9 else 1)
    assert await redis_state(any_redis) == before
    await assert_ttls_untouched(any_redis)
    blocked = keys_of(any_redis, "story", blocked_id).blocked("2025-11-24")
    assert await any_redis.hgetall(blocked) == {reason.value.encode(): b"1"}
    assert await pending(any_redis, blocked_id) == (blocked_id == 7)
