"""What the tracker leaves in Redis: a TTL on every key but counters and cached counts, TTLs long
enough for the rules they serve, and no personal data anywhere (invariant 5).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from tests.support import FakeClock
from viewmw import InvalidKeyError, Limits, Settings, Store, ViewTracker
from viewmw.identity import ViewerIdentity
from viewmw.operator_stats import abuse_stats

SECRET = "test-secret-0123456789"
# Generous request deadlines: on a busy machine a late reply must not become a missing count.
GENEROUS: dict[str, float] = {"redis_timeout": 5.0, "database_request_timeout": 5.0}
HOUR = 3600.0

# What a request might carry: none of it may reach Redis.
CLIENTS = [
    ("203.0.113.7", "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"),
    ("2001:db8::17", "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) Safari/604.1"),
    ("198.51.100.23", "curl/8.5.0"),
]
# User ids that are not short safe tokens (an e-mail address, a signed session value) are
# hashed by the identity module too.
USER_IDS = ["someone@example.com", "s%3AJx9kQ2v.AbCdEf-session"]


def is_exempt_from_ttl(key: str, prefix: str) -> bool:
    """Counters (pending views, in total and per day), cached database counts and the dirty/epoch
    bookkeeping live until used."""
    name = key.removeprefix(prefix)
    return bool(
        re.fullmatch(r"[a-z][a-z0-9_]*:(views|dbviews|days):[A-Za-z0-9_-]+", name)
        or name in ("viewmw:dirty", "viewmw:dirty:sync", "viewmw:epoch")
    )


async def run_workload(tracker: ViewTracker, clock: FakeClock) -> set[str]:
    """Views by users and anonymous clients over three days, counted and blocked, and reads.
    Viewer keys are built as the middleware builds them (viewmw.identity).

    Returns the hashed viewers used.
    """
    identity = ViewerIdentity(SECRET, tracker.settings.timezone, clock=clock)
    hashed: set[str] = set()
    for _day in range(3):
        anonymous = [identity.anonymous_viewer(a, agent.encode()) for a, agent in CLIENTS]
        users = [identity.user_viewer(user_id) for user_id in USER_IDS]
        hashed |= {*anonymous, *(user for user in users if user)}
        viewers = ["user:1", "user:42", *anonymous, *(user for user in users if user)]
        for viewer in viewers:
            for kind, content_id in (("story", 7), ("story", 8), ("task", "t-1")):
                await tracker.track_view(kind, content_id, viewer)
                await tracker.track_view(kind, content_id, viewer)  # blocked: cooldown
        clock.advance(HOUR)
        await tracker.track_view("story", 7, "user:1")  # blocked: viewed today
        await tracker.get_view_counts("story", [7, 8, 9])
        await tracker.get_view_count("task", "t-1")
        await abuse_stats(tracker.redis, tracker.settings, tracker.store)
        clock.advance(23 * HOUR)
    return hashed


async def all_keys(redis: aioredis.Redis) -> list[str]:
    return sorted([key.decode() async for key in redis.scan_iter(count=1000)])


@pytest.mark.parametrize("prefix", ["", "app1:"])
async def test_every_key_but_counters_and_cached_counts_has_a_ttl(
    real_redis: aioredis.Redis, pg_store: Store, clock: FakeClock, prefix: str
) -> None:
    settings = Settings(key_prefix=prefix, timezone="America/New_York", secret=SECRET, **GENEROUS)
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    await run_workload(tracker, clock)

    keys = await all_keys(real_redis)
    assert keys and all(key.startswith(prefix) for key in keys)
    kinds = {key.removeprefix(prefix).split(":")[0] for key in keys}
    assert {"viewed", "daily_views", "story", "task", "viewmw"} <= kinds
    without_ttl = [key for key in keys if await real_redis.ttl(key) <= 0]
    assert without_ttl, "the counters exist"
    assert [key for key in without_ttl if not is_exempt_from_ttl(key, prefix)] == []
    # One hash per viewer, a field per content, replaces the original's three keys per pair.
    assert not [key for key in keys if re.search(r"(^|:)(daily_viewed|cooldown):", key)]
    # (Anonymous viewers change with the calendar day, so each day brings new ones.)
    viewed = [key for key in keys if key.startswith(f"{prefix}viewed:")]
    assert viewed
    for key in viewed:
        assert sorted(await real_redis.hkeys(key)) == [b"story:7", b"story:8", b"task:t-1"]


@pytest.mark.parametrize(
    "limits",
    [
        Limits(),
        Limits(session_seconds=7 * 86400),
        Limits(view_cooldown_seconds=3 * 86400, session_seconds=3600),
        Limits(max_views_per_session=None, max_daily_views_per_user=None),
    ],
    ids=["defaults", "long-session", "long-cooldown", "rules-off"],
)
@pytest.mark.parametrize("timezone", ["UTC", "Asia/Tokyo", "America/New_York"])
async def test_ttls_outlive_the_rules_they_serve_and_no_more(
    real_redis: aioredis.Redis, clock: FakeClock, limits: Limits, timezone: str
) -> None:
    """TTLs only reclaim memory: a key must not expire while its rule still needs it."""
    tracker = ViewTracker(
        real_redis, None, Settings(limits=limits, timezone=timezone, **GENEROUS), clock=clock
    )
    zone = ZoneInfo(timezone)
    for hours in (0, 11.5, 23.99):  # noon UTC, then near both ends of local days
        clock.now += hours * HOUR
        now = clock.now
        viewer = f"user:{int(hours * 100)}"
        assert (await tracker.track_view("story", 7, viewer)).counted
        local = datetime.fromtimestamp(now, zone)
        next_midnight = datetime.combine(
            local.date() + timedelta(days=1), datetime.min.time(), zone
        )
        rest_of_day = next_midnight.timestamp() - now

        session_ttl = await real_redis.ttl(f"viewed:{viewer}")
        needed = max(limits.session_seconds, limits.view_cooldown_seconds or 0, rest_of_day)
        assert needed <= session_ttl <= needed + 2 * HOUR
        if limits.max_daily_views_per_user:
            day = local.date().isoformat()
            daily_ttl = await real_redis.ttl(f"daily_views:{viewer}:{day}")
            assert rest_of_day <= daily_ttl <= rest_of_day + 2 * HOUR
        else:
            assert await real_redis.keys("daily_views:*") == []


async def test_no_address_user_agent_or_session_id_reaches_redis(
    real_redis: aioredis.Redis, pg_store: Store, clock: FakeClock
) -> None:
    settings = Settings(secret=SECRET, **GENEROUS)
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    hashed = await run_workload(tracker, clock)

    stored: list[str] = []
    for key in await all_keys(real_redis):
        stored.append(key)
        kind = await real_redis.type(key)
        value: Any
        if kind == b"string":
            value = [await real_redis.get(key)]
        elif kind == b"hash":
            value = [item for pair in (await real_redis.hgetall(key)).items() for item in pair]
        elif kind == b"set":
            value = list(await real_redis.smembers(key))
        elif kind == b"zset":
            value = await real_redis.zrange(key, 0, -1)
        else:  # pragma: no cover
            raise AssertionError(f"unexpected {kind!r} at {key}")
        # HyperLogLogs of viewers are binary registers: hashes of the viewers, never the viewers.
        stored.extend(item.decode(errors="replace") for item in value)
    text = "\n".join(stored)

    for address, agent in CLIENTS:
        assert address not in text
        assert agent not in text
        for word in re.findall(r"[A-Za-z]{4,}", agent):
            assert word not in text, word
    for user_id in USER_IDS:
        assert user_id not in text
        assert user_id.split("@")[0] not in text
    assert "example" not in text
    assert not re.search(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", text)
    # What identifies a viewer is its key: a short safe user id, or else a keyed hash.
    stored_viewers = set(re.findall(r"(?:anon|user):[A-Za-z0-9_-]+", text))
    assert stored_viewers == hashed | {"user:1", "user:42"}


@pytest.mark.parametrize(
    "viewer",
    [
        "anon:1.2.3.4",
        "anon:203.0.113.7",
        "anon:::1",
        "anon:2001:db8::17",
        "anon:::ffff:192.0.2.1",
        "anon:Mozilla/5.0 (X11; Linux x86_64)",
        "anon:curl/8.5.0",
        "anon:s%3AJx9kQ2v.AbCdEf",
        "user:someone@example.com",
        "1.2.3.4",
    ],
)
async def test_raw_addresses_and_user_agents_are_refused_as_viewers(
    real_redis: aioredis.Redis, clock: FakeClock, viewer: str
) -> None:
    tracker = ViewTracker(real_redis, None, Settings(**GENEROUS), clock=clock)
    with pytest.raises(InvalidKeyError):
        await tracker.track_view("story", 7, viewer)
    assert await real_redis.dbsize() == 0
