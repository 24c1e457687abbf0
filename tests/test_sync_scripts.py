"""The snapshot and settle scripts do their work a slice of keys per command; here each is held
to the per-content model it replaces, on random states (leftover syncing counts, items already
recorded, cached database counts with a TTL, refused types, sets small and large), on the real
Redis and on fakeredis.

Per content, the snapshot is: read pending; for a refused type, put the content back in the
dirty set if it has views; otherwise, if it has views, delete pending, add them to syncing and to
the batch's item. The settle walks the batch's items and, per item: takes it off syncing
(deleting syncing at zero or below), adds it to the cached database count if one is cached, and
forgets the item; the batch goes once no item is left.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from viewmw import KeySchema
from viewmw.scripts import Scripts

KEYS = KeySchema("app:")
TOKEN, BATCH, FENCE = "token", "b1", "7"
TYPES = ("story", "fantasy", "poem")  # "poem" is refused in the snapshot tests
SEEDS = range(12)
TEMPLATES = [KEYS.pending_template, KEYS.syncing_template, KEYS.days_template]
SETTLE_TEMPLATES = [KEYS.syncing_template, KEYS.database_count_template, KEYS.ranking_template]


@dataclass
class State:
    """What Redis holds for the contents of one test, as plain numbers (0 = no key)."""

    pending: Counter[str] = field(default_factory=Counter)
    syncing: Counter[str] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    cached: dict[str, int] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)


def keys_of(member: str) -> tuple[str, str, str]:
    content = KeySchema.split_member(member)
    return KEYS.pending(*content), KEYS.syncing(*content), KEYS.database_count(*content)


def random_state(rng: random.Random, size: int) -> tuple[list[str], State]:
    members = [f"{rng.choice(TYPES)}:{n}" for n in rng.sample(range(10 * size), size)]
    state = State()
    for member in members:
        if rng.random() < 0.8:
            state.pending[member] = rng.randint(1, 50)
        if rng.random() < 0.3:
            state.syncing[member] = rng.randint(1, 50)
        if rng.random() < 0.2:
            state.items[member] = rng.randint(1, 50)
        if rng.random() < 0.3:
            state.cached[member] = rng.randint(0, 500)
    return members, state


async def write(redis: aioredis.Redis, state: State) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(KEYS.sync_lock, TOKEN)
        pipe.hset(KEYS.sync_batch, mapping={"id": BATCH, "fence": FENCE})
        for member, amount in state.pending.items():
            pipe.set(keys_of(member)[0], amount)
        for member, amount in state.syncing.items():
            pipe.set(keys_of(member)[1], amount)
        for member, amount in state.cached.items():
            pipe.set(keys_of(member)[2], amount, ex=3600)
        if state.items:
            pipe.hset(KEYS.sync_batch_items(BATCH), mapping=dict(state.items))
        await pipe.execute()


async def read(redis: aioredis.Redis, members: list[str]) -> State:
    state = State()
    for member in members:
        pending, syncing, cached = await redis.mget(*keys_of(member))
        if pending is not None:
            state.pending[member] = int(pending)
        if syncing is not None:
            state.syncing[member] = int(syncing)
        if cached is not None:
            state.cached[member] = int(cached)
            assert await redis.ttl(keys_of(member)[2]) > 0, f"{member}: cached count lost its TTL"
    items = await redis.hgetall(KEYS.sync_batch_items(BATCH))
    state.items = Counter({k.decode(): int(v) for k, v in items.items()})
    state.dirty = {m.decode() for m in await redis.smembers(KEYS.dirty)}
    return state


def snapshot_model(members: list[str], state: State, refused: set[str]) -> tuple[State, int, int]:
    """The per-content snapshot of every member; returns the new state, contents and views."""
    after = State(
        Counter(state.pending), Counter(state.syncing), Counter(state.items), dict(state.cached)
    )
    contents = views = 0
    for member in members:
        amount = state.pending[member]
        if KeySchema.split_member(member)[0] in refused:
            if amount > 0:
                after.dirty.add(member)
        elif amount > 0:
            del after.pending[member]
            after.syncing[member] += amount
            after.items[member] += amount
            contents, views = contents + 1, views + amount
    return after, contents, views


def settle_model(members: list[str], state: State) -> State:
    """The per-content settle of ``members`` (those that are items)."""
    after = State(
        Counter(state.pending), Counter(state.syncing), Counter(state.items), dict(state.cached)
    )
    for member in dict.fromkeys(members):
        amount = after.items.pop(member, None)
        if amount is None:
            continue
        after.syncing[member] -= amount
        if after.syncing[member] <= 0:
            del after.syncing[member]
        if member in after.cached:
            after.cached[member] += amount
    return after


@pytest.mark.parametrize("size", [10, 300], ids=["small-set", "large-set"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_the_snapshot_moves_exactly_what_the_per_content_steps_would(
    any_redis: aioredis.Redis, seed: int, size: int
) -> None:
    rng = random.Random(seed)
    members, state = random_state(rng, size)
    await write(any_redis, state)
    await any_redis.sadd(KEYS.draining, *members)
    scripts = Scripts.register(any_redis)
    chunk = rng.choice([1, 7, 64, 1000])

    cursor, calls, moving_calls, contents, views, left = "0", 0, 0, 0, 0, len(members)
    while left:
        reply = await scripts.snapshot(
            keys=SNAPSHOT_KEYS,
            args=[TOKEN, BATCH, chunk, FENCE, cursor, "2025-11-24", *TEMPLATES, "poem"],
        )
        moved, moved_views, left, cursor, taken = reply
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        assert 0 <= moved <= taken <= chunk
        calls += 1
        moving_calls += moved > 0
        contents, views = contents + moved, views + moved_views
        assert calls <= 10 * size, "the walk through the run's set does not end"

    expected, expected_contents, expected_views = snapshot_model(members, state, {"poem"})
    assert await read(any_redis, members) == expected
    assert (contents, views) == (expected_contents, expected_views)
    assert int(await any_redis.get(KEYS.epoch) or 0) == moving_calls


SETTLE_KEYS = [
    KEYS.sync_batch,
    KEYS.sync_batch_items(BATCH),
    KEYS.epoch,
    KEYS.sync_lock,
    KEYS.sync_batch_days(BATCH),
]


# The snapshot's keys for the batch BATCH, in its script's order.
SNAPSHOT_KEYS = [
    KEYS.sync_lock,
    KEYS.sync_batch,
    KEYS.sync_batch_items(BATCH),
    KEYS.draining,
    KEYS.epoch,
    KEYS.dirty,
    KEYS.sync_batch_days(BATCH),
]


async def settle_all(redis: aioredis.Redis, chunk: int) -> tuple[int, int]:
    """Walk the batch's items with the settle script until none is left, as the sync does;
    returns (items settled, calls)."""
    scripts = Scripts.register(redis)
    cursor, left, settled, calls = "0", 1, 0, 0
    while left:
        reply = await scripts.settle(
            keys=SETTLE_KEYS,
            args=[BATCH, TOKEN, FENCE, cursor, chunk, *SETTLE_TEMPLATES],
        )
        done, left, cursor = reply
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        assert 0 <= done <= chunk
        assert left == await redis.hlen(KEYS.sync_batch_items(BATCH))
        settled, calls = settled + done, calls + 1
        assert calls <= 100 * (settled + 1), "the walk through the items does not end"
    return settled, calls


@pytest.mark.parametrize("size", [10, 300], ids=["small-batch", "large-batch"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_the_settle_settles_exactly_what_the_per_content_steps_would(
    any_redis: aioredis.Redis, seed: int, size: int
) -> None:
    rng = random.Random(seed)
    members, state = random_state(rng, size)
    for member in rng.sample(members, size * 2 // 3):  # most are items, some syncing more
        state.items[member] = rng.randint(1, 50)
        state.syncing[member] = state.items[member] + rng.choice([0, 0, 0, 3, -2])
    await write(any_redis, state)
    chunk = rng.choice([1, 7, 64, 5000])

    settled, calls = await settle_all(any_redis, chunk)

    assert await read(any_redis, members) == settle_model(list(state.items), state)
    assert settled == len(state.items)
    assert int(await any_redis.get(KEYS.epoch) or 0) == calls
    assert not await any_redis.exists(KEYS.sync_batch), "the settled batch was left behind"


async def test_a_partly_settled_batch_stays_and_settles_nothing_twice(
    any_redis: aioredis.Redis,
) -> None:
    state = State(syncing=Counter({"story:1": 2, "story:2": 3, "story:3": 4}))
    state.items = Counter(state.syncing)
    state.cached = {"story:1": 10, "story:2": 20, "story:3": 30}
    await write(any_redis, state)
    reply = await Scripts.register(any_redis).settle(
        keys=SETTLE_KEYS,
        args=[BATCH, TOKEN, FENCE, "0", 1, *SETTLE_TEMPLATES],
    )
    assert reply[:2] == [1, 2]
    assert await any_redis.hget(KEYS.sync_batch, "id") == BATCH.encode()
    first = await read(any_redis, ["story:1", "story:2", "story:3"])
    (done,) = set(state.items) - set(first.items)
    assert first == settle_model([done], state)

    # The rest, walked again from the start (a sync that took over knows no cursor).
    assert await settle_all(any_redis, 2) == (2, 1)
    assert await read(any_redis, ["story:1", "story:2", "story:3"]) == settle_model(
        list(state.items), state
    )


async def test_the_settle_refuses_a_caller_that_does_not_own_the_batch(
    any_redis: aioredis.Redis,
) -> None:
    state = State(syncing=Counter({"story:1": 2}), items=Counter({"story:1": 2}))
    await write(any_redis, state)
    scripts = Scripts.register(any_redis)
    owner = [BATCH, TOKEN, FENCE, "0", 10, *SETTLE_TEMPLATES]
    for wrong in (0, 1, 2):  # batch id, lock token, fence
        args = list(owner)
        args[wrong] = "other"
        reply = await scripts.settle(
            keys=SETTLE_KEYS,
            args=args,
        )
        assert reply == [-1]
    after = await read(any_redis, ["story:1"])
    assert (after.syncing, after.items) == (state.syncing, state.items)
    assert not await any_redis.exists(KEYS.epoch), "a refused settle moved the epoch"


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_settle_takes_each_items_days_off_the_rankings_as_per_item_steps_would(
    any_redis: aioredis.Redis, seed: int
) -> None:
    """Per item and day: ZINCRBY by minus the amount, ZREM at 0 or below (so a content that is
    not in the ranking stays out of it); crawler fields and zero amounts leave rankings alone."""
    rng = random.Random(seed)
    days = ["2025-11-23", "2025-11-24"]
    members = [f"{rng.choice(TYPES)}:{n}" for n in rng.sample(range(1000), 40)]
    state = State()
    encoded: dict[str, str] = {}
    rankings: dict[str, dict[str, float]] = {}
    for member in members:
        content_type, content_id = KeySchema.split_member(member)
        fields = [
            f"{rng.choice(days)}{rng.choice(['', '', ':c'])}={rng.randint(0, 9)}"
            for _ in range(rng.randint(1, 3))  # a field may come more than once
        ]
        encoded[member] = ",".join(fields)
        state.items[member] = state.syncing[member] = rng.randint(1, 9)
        for day in days:
            if rng.random() < 0.7:
                ranking = rankings.setdefault(KEYS.ranking(content_type, day), {})
                ranking[content_id] = rng.randint(1, 15)
    await write(any_redis, state)
    await any_redis.hset(KEYS.sync_batch_days(BATCH), mapping=encoded)
    for key, scores in rankings.items():
        await any_redis.zadd(key, scores)

    expected = {key: dict(scores) for key, scores in rankings.items()}
    for member, fields in encoded.items():
        content_type, content_id = KeySchema.split_member(member)
        for field_name, amount in (part.split("=") for part in fields.split(",")):
            if ":" in field_name or amount == "0":
                continue
            ranking = expected.setdefault(KEYS.ranking(content_type, field_name), {})
            ranking[content_id] = ranking.get(content_id, 0) - int(amount)
            if ranking[content_id] <= 0:
                del ranking[content_id]

    await settle_all(any_redis, rng.choice([1, 7, 5000]))

    for key, scores in expected.items():
        held = await any_redis.zrange(key, 0, -1, withscores=True)
        assert {member.decode(): score for member, score in held} == scores
    assert not await any_redis.exists(KEYS.sync_batch_days(BATCH))
