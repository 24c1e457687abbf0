"""The daily limit on a Redis Cluster (docs/keys.md, *The daily limit: the one rule across
slots*): reserve in the viewer's shard, decide in the content's, release what a content rule
blocked. On a real local cluster (tests/cluster_support.py):

- the quota never lets a viewer past the limit, and each step is idempotent per view id;
- the three steps decide exactly as the one ``record_views`` call of a single Redis does;
- a step lost between the others (a crash) can only leave the quota too strict, never lenient;
- concurrent views of one viewer take exactly the limit's places.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from viewmw.daily_quota import DailyQuota, QuotaClaim, Reservation
from viewmw.keys import KeySchema, viewer_shard
from viewmw.scripts import Scripts
from viewmw.shards import DEFAULT_CLUSTER_SHARDS, ContentShards

DAY, DAY_START, DAY_END = "2026-11-30", 1_764_460_800, 1_764_547_200
NOW = DAY_START + 12 * 3600
TTL = DAY_END - NOW + 3600
SHARDS = ContentShards("", DEFAULT_CLUSTER_SHARDS)


def _claim(viewer: str, view_id: str | None = None) -> QuotaClaim:
    return QuotaClaim(viewer, DAY, view_id or uuid.uuid4().hex, TTL)


def _quota(client: Any) -> DailyQuota:
    return DailyQuota(client, SHARDS.schemas[0])


async def _held(client: Any, viewer: str) -> int:
    """The places a viewer's day holds (``n``)."""
    return int(await client.hget(SHARDS.schemas[0].daily_views(viewer, DAY), "n") or 0)


# The quota alone -------------------------------------------------------------------------------


async def test_places_run_out_at_the_limit_and_a_view_id_takes_one_place(
    cluster_redis: RedisCluster,
) -> None:
    quota = _quota(cluster_redis)
    claims = [_claim("user:1") for _ in range(5)]
    assert await quota.reserve(claims, 3) == [Reservation.RESERVED] * 3 + [Reservation.FULL] * 2
    # Asked again (a retried call, a replayed view), every view gets the same answer.
    assert await quota.reserve(claims, 3) == [Reservation.RESERVED] * 3 + [Reservation.FULL] * 2
    assert await _held(cluster_redis, "user:1") == 3
    key = SHARDS.schemas[0].daily_views("user:1", DAY)
    assert 0 < await cluster_redis.ttl(key) <= TTL


async def test_a_release_gives_back_one_place_once(cluster_redis: RedisCluster) -> None:
    quota = _quota(cluster_redis)
    first, second, third = _claim("anon:a"), _claim("anon:a"), _claim("anon:a")
    assert await quota.reserve([first, second], 2) == [Reservation.RESERVED] * 2
    assert await quota.reserve([third], 2) == [Reservation.FULL]

    assert await quota.release([first]) == 1
    assert await quota.release([first]) == 0  # a retried release changes nothing
    assert await quota.release([third]) == 0  # never held a place
    assert await quota.release([_claim("anon:never")]) == 0
    assert await _held(cluster_redis, "anon:a") == 1
    # The released view keeps its answer; the place goes to the next view.
    assert await quota.reserve([first, third], 2) == [Reservation.RELEASED, Reservation.RESERVED]
    assert await _held(cluster_redis, "anon:a") == 2
    assert await cluster_redis.exists(SHARDS.schemas[0].daily_views("anon:never", DAY)) == 0


async def test_viewers_of_many_shards_are_answered_in_order_one_call_per_shard(
    cluster_redis: RedisCluster,
) -> None:
    viewers = [f"user:{n}" for n in range(40)]
    assert len({viewer_shard(viewer, SHARDS.count or 1) for viewer in viewers}) > 10
    claims = [_claim(viewer) for viewer in viewers for _ in range(2)]
    answers = await _quota(cluster_redis).reserve(claims, 1)
    assert answers == [Reservation.RESERVED, Reservation.FULL] * 40
    for viewer in viewers:
        key = SHARDS.schemas[0].daily_views(viewer, DAY)
        assert key_slot(key.encode()) == key_slot(
            f"{{v:{viewer_shard(viewer, SHARDS.count or 1)}}}".encode()
        )
        assert await _held(cluster_redis, viewer) == 1


async def test_concurrent_views_of_one_viewer_take_exactly_the_limits_places(
    cluster_redis: RedisCluster,
) -> None:
    quota = _quota(cluster_redis)
    claims = [_claim("user:busy") for _ in range(120)]
    results = await asyncio.gather(
        *(quota.reserve(claims[n : n + 3], 25) for n in range(0, len(claims), 3))
    )
    answers = Counter(answer for result in results for answer in result)
    assert answers == {Reservation.RESERVED: 25, Reservation.FULL: 95}
    assert await _held(cluster_redis, "user:busy") == 25


def test_a_single_redis_keeps_its_counter_and_has_no_quota() -> None:
    with pytest.raises(ValueError, match="only on a Redis Cluster"):
        DailyQuota(object(), KeySchema(""))


async def test_a_limit_below_one_is_refused(cluster_redis: RedisCluster) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await _quota(cluster_redis).reserve([_claim("user:1")], 0)


# The three steps against the single call -------------------------------------------------------

SESSION_LIMIT = 2  # a content rule that blocks reserved views, so that releases happen
DAILY_LIMIT = 3
_LIMIT_ARGS = [SESSION_LIMIT, 86400, DAILY_LIMIT, 0, 0, 3600, 0]


def _record_call(
    keys: KeySchema, viewer: str, content_id: str, quota: str
) -> tuple[list[str], list[Any]]:
    """``record_views`` keys and arguments for one view of ``story:content_id`` at ``NOW``.

    ``quota`` is ``""`` on a single Redis (the daily counter is a key of the call) and the
    reservation's answer on a cluster (the counter's place holds a key of the content's slot).
    """
    days = keys.days("story", content_id)
    daily = keys.daily_views(viewer, DAY) if quota == "" else days
    view_keys = [
        keys.pending("story", content_id),
        keys.syncing("story", content_id),
        keys.database_count("story", content_id),
        keys.sessions(viewer),
        daily,
        days,
        keys.uniques("story", content_id, DAY),
        keys.ranking("story", DAY),
        keys.blocked(DAY),
        keys.pair_session(viewer, "story", content_id),
    ]
    view_args = [NOW, DAY_START, DAY_END, TTL, TTL, f"story:{content_id}", 0, DAY]
    view_args += [content_id, viewer, 0, TTL, "", quota]
    return [keys.dirty, keys.epoch, keys.sync_batch, *view_keys], [*_LIMIT_ARGS, *view_args]


async def _decide(scripts: Scripts, keys: KeySchema, viewer: str, content: str, quota: str) -> int:
    """Decide one view; returns its reason code (0: counted)."""
    call_keys, args = _record_call(keys, viewer, content, quota)
    reply = await scripts.record_views(keys=call_keys, args=args)
    counted, reason = reply[2], reply[3]
    assert counted in (0, 1) and (counted == 1) == (reason == 0)
    return int(reason)


async def _three_steps(
    scripts: Scripts, quota: DailyQuota, viewer: str, content: str, crash: str | None = None
) -> int | None:
    """One view on the cluster; ``crash`` stops it after ``reserve`` or ``decide``. Returns its
    reason code, or ``None`` when it was never decided."""
    claim = _claim(viewer)
    (reservation,) = await quota.reserve([claim], DAILY_LIMIT)
    if crash == "reserve":
        return None
    answer = "r" if reservation is Reservation.RESERVED else "f"
    reason = await _decide(scripts, SHARDS.of("story", content), viewer, content, answer)
    if crash != "decide" and reason != 0 and reservation is Reservation.RESERVED:
        await quota.release([claim])
    return reason


views = st.lists(
    st.tuples(st.sampled_from(["user:1", "user:2", "anon:z"]), st.sampled_from("abcd")),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(views=views)
async def test_the_three_steps_decide_every_view_as_the_single_call_does(
    views: list[tuple[str, str]], cluster_redis: RedisCluster, real_redis: aioredis.Redis
) -> None:
    await cluster_redis.flushall(target_nodes=RedisCluster.PRIMARIES)
    await real_redis.flushdb()
    cluster_scripts, single_scripts = Scripts.register(cluster_redis), Scripts.register(real_redis)
    quota = DailyQuota(cluster_redis, SHARDS.schemas[0], cluster_scripts)
    single = KeySchema("")
    counted: Counter[str] = Counter()
    for viewer, content in views:
        on_cluster = await _three_steps(cluster_scripts, quota, viewer, content)
        on_single = await _decide(single_scripts, single, viewer, content, "")
        assert on_cluster == on_single, (viewer, content)
        counted[viewer] += on_cluster == 0
    for viewer in {viewer for viewer, _ in views}:
        # Every reservation of a blocked view was given back: the quota holds the views counted,
        # as the single Redis' counter does.
        assert await _held(cluster_redis, viewer) == counted[viewer]
        assert int(await real_redis.get(single.daily_views(viewer, DAY)) or 0) == counted[viewer]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    views=views,
    crashes=st.lists(st.sampled_from([None, None, None, "reserve", "decide"]), min_size=25),
)
async def test_a_lost_step_leaves_the_quota_strict_never_lenient(
    views: list[tuple[str, str]], crashes: list[str | None], cluster_redis: RedisCluster
) -> None:
    await cluster_redis.flushall(target_nodes=RedisCluster.PRIMARIES)
    scripts = Scripts.register(cluster_redis)
    quota = DailyQuota(cluster_redis, SHARDS.schemas[0], scripts)
    counted: Counter[str] = Counter()
    for (viewer, content), crash in zip(views, crashes, strict=False):
        counted[viewer] += await _three_steps(scripts, quota, viewer, content, crash) == 0
    for viewer in {viewer for viewer, _ in views}:
        held = await _held(cluster_redis, viewer)
        assert counted[viewer] <= held <= DAILY_LIMIT


async def test_concurrent_views_across_contents_count_exactly_the_limit(
    cluster_redis: RedisCluster,
) -> None:
    scripts = Scripts.register(cluster_redis)
    quota = DailyQuota(cluster_redis, SHARDS.schemas[0], scripts)
    # 40 views of 40 contents (no content rule blocks any), all at once: the daily limit alone
    # decides, on as many content shards as the contents fall in.
    reasons = await asyncio.gather(
        *(_three_steps(scripts, quota, "user:fast", f"c{n}") for n in range(40))
    )
    assert Counter(reasons) == {0: DAILY_LIMIT, 4: 40 - DAILY_LIMIT}
    assert await _held(cluster_redis, "user:fast") == DAILY_LIMIT
    pending = [
        int(await cluster_redis.get(SHARDS.of("story", f"c{n}").pending("story", f"c{n}")) or 0)
        for n in range(40)
    ]
    assert sum(pending) == DAILY_LIMIT
