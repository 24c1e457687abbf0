"""The outage path without HTTP: late replies, the probe, the outbox and the exactly-once replay."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
import redis.asyncio as aioredis

from tests.asgi_support import StubRedis
from tests.support import FakeClock
from viewmw import (
    CircuitBreaker,
    Outbox,
    OutboxEvent,
    RedisProbe,
    Replayer,
    ResilientTracker,
    Settings,
    Store,
    ViewTracker,
)
from viewmw.outage.breaker import BreakerState


class ScriptedProbe(RedisProbe):
    """A probe whose answer the test sets, counting how often it was asked."""

    def __init__(self, healthy: bool = True) -> None:
        super().__init__(None)
        self.answer = healthy
        self.asked = 0

    async def healthy(self) -> bool:
        self.asked += 1
        return self.answer


def resilient(
    tracker: ViewTracker, store: Store, probe: RedisProbe, breaker_clock: FakeClock
) -> ResilientTracker:
    return ResilientTracker(
        tracker,
        Outbox(store.engine),
        breaker=CircuitBreaker(failure_threshold=3, reset_seconds=5.0, clock=breaker_clock),
        probe=probe,
    )


async def test_a_late_reply_is_decided_by_redis_and_never_counts_against_the_breaker(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    # A deadline that passes before any reply can be read: every call is late.
    late = ViewTracker(real_redis, store, settings.replace(redis_timeout=1e-6), clock=clock)
    probe = ScriptedProbe(healthy=True)
    failover = resilient(late, store, probe, FakeClock(now=0.0))
    try:
        results = [await failover.track_view("story", "7001", "user:1") for _ in range(5)]
        await failover.drain()
    finally:
        await failover.aclose()
    assert all(not r.counted and not r.queued and r.reason is None for r in results)
    assert failover.breaker.state is BreakerState.CLOSED and failover.breaker.opened_count == 0
    assert probe.asked >= 1 and failover.late_replies == 5
    # All five reached the script, which admitted one: nothing went anywhere else.
    assert await real_redis.get("story:views:7001") == b"1"
    assert await Outbox(store.engine).counts("story", ["7001"]) == {"7001": 0}
    on_time = ViewTracker(real_redis, store, settings, clock=clock)
    again = await on_time.track_view("story", "7001", "user:1")
    assert not again.counted and again.reason == "cooldown"


async def test_a_probe_that_gets_no_answer_opens_the_breaker_and_views_go_to_the_outbox(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    late = ViewTracker(real_redis, store, settings.replace(redis_timeout=1e-6), clock=clock)
    failover = resilient(late, store, ScriptedProbe(healthy=False), FakeClock(now=0.0))
    try:
        first = await failover.track_view("story", "1", "user:1")
        await failover.drain()
        assert failover.breaker.state is BreakerState.OPEN
        queued = [await failover.track_view("story", "1", f"user:{n}") for n in range(2, 5)]
    finally:
        await failover.aclose()
    assert not first.counted and not first.queued
    assert [q.queued for q in queued] == [True] * 3
    # Shown: database + outbox. The first view, pending in an unreachable Redis, is not in it.
    assert [q.count.total if q.count else None for q in queued] == [1, 2, 3]
    assert await Outbox(store.engine).counts("story", ["1"]) == {"1": 3}


async def test_refused_connections_open_the_breaker_after_three(
    store: Store, settings: Settings, clock: FakeClock
) -> None:
    from tests.asgi_support import free_port
    from viewmw.assembly import connect_redis

    down = connect_redis(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    failover = resilient(
        ViewTracker(down, store, settings, clock=clock), store, ScriptedProbe(), FakeClock(0.0)
    )
    try:
        results = [await failover.track_view("story", "1", f"user:{n}") for n in range(5)]
    finally:
        await failover.aclose()
        await down.aclose()
    # Each refused call was never sent: kept in the outbox from the first, the breaker open
    # after three all the same.
    assert [r.queued for r in results] == [True] * 5
    assert failover.breaker.opened_count == 1
    assert await Outbox(store.engine).counts("story", ["1"]) == {"1": 5}


async def test_a_view_kept_whose_count_cannot_be_read_says_which_part_failed(
    store: Store,
    settings: Settings,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.asgi_support import free_port
    from viewmw.assembly import connect_redis

    async def database_gone(*_: object) -> object:
        raise OSError("the database went away")

    down = connect_redis(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    failover = resilient(
        ViewTracker(down, store, settings, clock=clock), store, ScriptedProbe(), FakeClock(0.0)
    )
    monkeypatch.setattr(store, "read_counts", database_gone)
    try:
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            result = await failover.track_view("story", "1", "user:1")
    finally:
        await failover.aclose()
        await down.aclose()
    # The view is kept; only the count shown with it is missing, and the log says so.
    assert result.queued and result.count is None
    assert await Outbox(store.engine).counts("story", ["1"]) == {"1": 1}
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "reading a count from the database during a Redis outage failed" in line
    assert line.endswith("the response went out without a count")


async def test_a_hanging_redis_is_found_by_the_probe_timed_off_the_loop() -> None:
    async with StubRedis(reply=None) as hanging:
        probe = RedisProbe(hanging.url, timeout=0.2)
        try:
            assert await probe.healthy() is False
        finally:
            probe.close()


async def test_a_healthy_redis_passes_the_probe(real_redis: aioredis.Redis) -> None:
    from tests.support import REDIS_URL

    probe = RedisProbe(REDIS_URL, timeout=5.0)
    try:
        assert await probe.healthy() is True
        assert await RedisProbe(None).healthy() is True  # an in-process stand-in
    finally:
        probe.close()


async def test_when_redis_answers_again_the_outbox_is_replayed_once(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    breaker_clock = FakeClock(now=0.0)
    tracker = ViewTracker(real_redis, store, settings, clock=clock)
    failover = resilient(tracker, store, ScriptedProbe(), breaker_clock)
    try:
        failover.breaker.trip()  # as if Redis had failed
        for n in range(4):
            assert (await failover.track_view("story", "9", f"user:{n}")).queued
        assert (await failover.track_view("story", "9", "user:0")).queued  # a refresh
        breaker_clock.advance(5.0)
        probe_view = await failover.track_view("story", "10", "user:0")  # closes the breaker
        await failover.drain()
    finally:
        await failover.aclose()
    assert probe_view.counted
    # Four viewers counted once each; the refresh was decided by the rules, as live traffic.
    assert await real_redis.get("story:views:9") == b"4"
    assert await Outbox(store.engine).counts("story", ["9"]) == {"9": 0}
    assert await tracker.get_view_count("story", "9") == 4


async def test_a_replay_stopped_between_redis_and_the_delete_counts_nothing_twice(
    any_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    tracker = ViewTracker(any_redis, store, settings, clock=clock)
    outbox = Outbox(store.engine)
    for n in range(7):
        assert await outbox.add(OutboxEvent.new("story", str(n % 3), f"user:{n}", clock.now + n))

    async def killed(step: str) -> None:
        raise RuntimeError("the replayer died after Redis answered")

    with pytest.raises(RuntimeError):
        await Replayer(tracker, outbox, chunk=4, on_step=killed).replay()
    report = await Replayer(tracker, outbox, chunk=4).replay()
    assert (report.events, report.already_replayed, report.counted) == (7, 4, 3)
    pending = {c: await any_redis.get(f"story:views:{c}") for c in "012"}
    assert pending == {"0": b"3", "1": b"2", "2": b"2"}
    assert await outbox.oldest(10) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_replay_decides_as_if_redis_had_been_up_all_along(
    any_redis: aioredis.Redis, store: Store, settings: Settings, seed: int
) -> None:
    """Seeded traffic over three days, offered live to one tracker and replayed from the outbox
    to another: the same views count."""
    rng = random.Random(seed)
    start = FakeClock().now
    times = sorted(start + rng.uniform(0, 3 * 86400) for _ in range(120))
    views = [(t, f"user:{rng.randrange(6)}", str(rng.randrange(4))) for t in times]
    # Bursts: some views a few seconds apart, inside every window the rules have.
    views += [(t + rng.uniform(0, 30), v, c) for t, v, c in rng.sample(views, 30)]
    views.sort()

    live_clock = FakeClock(now=start)
    live = ViewTracker(any_redis, store, settings.replace(key_prefix="live:"), clock=live_clock)
    counted_live: Counter[str] = Counter()
    for at, viewer, content_id in views:
        live_clock.now = at
        if (await live.track_view("story", content_id, viewer)).counted:
            counted_live[content_id] += 1

    replayed = ViewTracker(any_redis, store, settings.replace(key_prefix="replay:"))
    outbox = Outbox(store.engine)
    for at, viewer, content_id in views:
        assert await outbox.add(OutboxEvent.new("story", content_id, viewer, at))
    report = await Replayer(replayed, outbox, chunk=16).replay()

    counted_replay = Counter(
        {c: int(await any_redis.get(f"replay:story:views:{c}") or 0) for c in "0123"}
    )
    assert report.events == len(views) and report.counted == sum(counted_live.values())
    assert +counted_replay == +counted_live
