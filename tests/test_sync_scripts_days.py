"""The per-day side of the snapshot and settle scripts, held to the per-content model: the
snapshot appends each content's days hash (and its undated views, on the fallback day) to what
the batch holds for it; the settle takes each item's days off the rankings once, even when a
sync that took over walks the items again from the start.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import redis.asyncio as aioredis

from tests.test_sync_scripts import (
    BATCH,
    FENCE,
    KEYS,
    SEEDS,
    SETTLE_KEYS,
    SETTLE_TEMPLATES,
    SNAPSHOT_KEYS,
    TEMPLATES,
    TOKEN,
    settle_all,
)
from viewmw import KeySchema
from viewmw.scripts import Scripts
from viewmw.sync import decode_days

DAYS = ("2025-11-22", "2025-11-23")
FALLBACK = "2025-11-24"


def summed(encoded: str) -> Counter[str]:
    """An encoding's amounts per field (``day`` for views, ``day:c`` for crawler views)."""
    total = Counter[str]()
    for day, (views, crawler) in decode_days(encoded).items():
        total[day] += views
        total[f"{day}:c"] += crawler
    return +total


async def own_batch(redis: aioredis.Redis) -> None:
    await redis.set(KEYS.sync_lock, TOKEN)
    await redis.hset(KEYS.sync_batch, mapping={"id": BATCH, "fence": FENCE})


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_snapshot_moves_each_contents_days_as_the_per_content_steps_would(
    any_redis: aioredis.Redis, seed: int
) -> None:
    """Contents with one day (the common case), several days, crawler views, views older than
    the days hash (undated), days and no pending views; some already items of the batch, with
    days of their own there. More contents than the scripts' slice of keys (100), in chunks
    around it. One content holds as many undated views as crawler views of its only field:
    not the one-day case, which is a day's views."""
    rng = random.Random(seed)
    await own_batch(any_redis)
    members = [f"story:{n}" for n in rng.sample(range(1000), 250)]
    expected: dict[str, Counter[str]] = {}
    for member in members:
        content = KeySchema.split_member(member)
        days = {
            day + kind: rng.randint(1, 9)
            for day in rng.sample(DAYS, rng.randint(1, 2))
            for kind in ("", ":c")
            if kind == "" or rng.random() < 0.3
        }
        if rng.random() < 0.2:  # crawler views only (and maybe views older than the days)
            days = {f"{DAYS[0]}:c": rng.randint(1, 9)}
        dated = sum(amount for field, amount in days.items() if ":" not in field)
        pending = dated + (rng.randint(1, 5) if rng.random() < 0.2 else 0)
        if member == members[0]:
            days, dated, pending = {f"{DAYS[0]}:c": 3}, 0, 3
        if pending:
            await any_redis.set(KEYS.pending(*content), pending)
        await any_redis.hset(KEYS.days(*content), mapping=days)
        expected[member] = Counter(days)
        if pending > dated:
            expected[member][FALLBACK] += pending - dated
        if rng.random() < 0.2:  # an item of the batch already (a snapshot taken before)
            await any_redis.hset(KEYS.sync_batch_items(BATCH), member, 4)
            await any_redis.hset(KEYS.sync_batch_days(BATCH), member, f"{DAYS[1]}=4")
            expected[member][DAYS[1]] += 4
    await any_redis.sadd(KEYS.draining, *members)
    chunk = rng.choice([1, 7, 100, 101, 1000])

    cursor, left = "0", len(members)
    while left:
        reply = await Scripts.register(any_redis).snapshot(
            keys=SNAPSHOT_KEYS,
            args=[TOKEN, BATCH, chunk, FENCE, cursor, FALLBACK, *TEMPLATES],
        )
        left, cursor = reply[2], reply[3]
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)

    held = await any_redis.hgetall(KEYS.sync_batch_days(BATCH))
    assert {k.decode(): summed(v.decode()) for k, v in held.items()} == expected
    assert not [key async for key in any_redis.scan_iter(match=KEYS.days("*", "*"))]


async def test_a_settle_walked_again_from_the_start_takes_nothing_off_a_ranking_twice(
    any_redis: aioredis.Redis,
) -> None:
    """A sync that takes over a partly settled batch walks its items from the start: the items
    settled before, and their days, are not read again."""
    await own_batch(any_redis)
    members = [f"story:{n}" for n in range(1, 7)]
    ranking = KEYS.ranking("story", DAYS[0])
    await any_redis.zadd(ranking, {str(n): 10 for n in range(1, 7)})
    for member in members:
        await any_redis.set(KEYS.syncing(*KeySchema.split_member(member)), 3)
    await any_redis.hset(KEYS.sync_batch_items(BATCH), mapping=dict.fromkeys(members, 3))
    await any_redis.hset(
        KEYS.sync_batch_days(BATCH), mapping=dict.fromkeys(members, f"{DAYS[0]}=3")
    )
    scripts = Scripts.register(any_redis)

    for settled in (2, 4):  # two partial settles, each from the start, as two take-overs would
        reply = await scripts.settle(
            keys=SETTLE_KEYS, args=[BATCH, TOKEN, FENCE, "0", 2, *SETTLE_TEMPLATES]
        )
        assert reply[0] == 2
        # A reader takes a committed batch's days off the ranking: a settled item's days go
        # with its views, in the same step.
        assert await any_redis.hlen(KEYS.sync_batch_days(BATCH)) == 6 - settled
    await settle_all(any_redis, 1)

    scores = await any_redis.zrange(ranking, 0, -1, withscores=True)
    assert {member.decode(): score for member, score in scores} == {str(n): 7 for n in range(1, 7)}
    assert not await any_redis.exists(KEYS.sync_batch, KEYS.sync_batch_days(BATCH))


async def test_the_settle_leaves_a_days_ranking_that_is_gone_gone(
    any_redis: aioredis.Redis,
) -> None:
    """A ranking that expired before the settle is not made again (ZADD XX on no key)."""
    await own_batch(any_redis)
    await any_redis.set(KEYS.syncing("story", "1"), 5)
    await any_redis.hset(KEYS.sync_batch_items(BATCH), "story:1", 5)
    await any_redis.hset(KEYS.sync_batch_days(BATCH), "story:1", f"{DAYS[0]}=2,{DAYS[1]}=3")
    await any_redis.zadd(KEYS.ranking("story", DAYS[1]), {"1": 4, "2": 1})

    await settle_all(any_redis, 10)

    assert not await any_redis.exists(KEYS.ranking("story", DAYS[0]))
    assert await any_redis.zrange(KEYS.ranking("story", DAYS[1]), 0, -1, withscores=True) == [
        (b"1", 1.0),
        (b"2", 1.0),
    ]
    assert not await any_redis.exists(KEYS.syncing("story", "1"))


@pytest.mark.parametrize("page", [100, 101, 1000])
async def test_the_settle_takes_each_items_days_off_its_own_rankings(
    any_redis: aioredis.Redis, page: int
) -> None:
    """250 items, one day each (the common case) or two, settled a page at a time around the
    scripts' slice of keys (100): each ranking loses exactly its own items' amounts."""
    rng = random.Random(page)
    await own_batch(any_redis)
    expected: dict[str, dict[str, float]] = {day: {} for day in DAYS}
    for n in range(1, 251):
        member = f"story:{n}"
        amounts = {day: rng.randint(1, 9) for day in rng.sample(DAYS, rng.randint(1, 2))}
        total = sum(amounts.values())
        await any_redis.set(KEYS.syncing("story", str(n)), total)
        await any_redis.hset(KEYS.sync_batch_items(BATCH), member, total)
        encoded = ",".join(f"{day}={amount}" for day, amount in amounts.items())
        await any_redis.hset(KEYS.sync_batch_days(BATCH), member, encoded)
        for day, amount in amounts.items():
            await any_redis.zadd(KEYS.ranking("story", day), {str(n): 20})
            expected[day][str(n)] = 20 - amount

    await settle_all(any_redis, page)

    for day in DAYS:
        scores = await any_redis.zrange(KEYS.ranking("story", day), 0, -1, withscores=True)
        assert {member.decode(): score for member, score in scores} == expected[day]
