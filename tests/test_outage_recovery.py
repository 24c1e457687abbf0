"""A Redis outage from start to end, on a private redis-server that is killed and restarted.

Views offered while Redis is unreachable go to the database outbox (``1; queued``) and are decided
later by the same script with their original times, exactly once: the counts equal what the same
traffic gives with Redis up all along, also when the replayer itself is killed mid-replay.
"""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.asgi_support import RedisProcess, free_port, served
from tests.outage_support import (
    DEBUG_HEADER,
    ROUTES,
    SECRET,
    Migration,
    Visits,
    client_for,
    database_counts,
    eventually,
    lock_waiters,
    outbox_size,
    recover,
    replay_markers,
    seed_stories,
    site,
    user_of,
)
from tests.support import DATABASE_URL, NOON_UTC, REDIS_URL, FakeClock
from viewmw import (
    CircuitBreaker,
    Limits,
    Outbox,
    OutboxEvent,
    Replayer,
    ResilientTracker,
    Settings,
    Store,
    ViewSync,
    ViewTracker,
    ViewTrackingMiddleware,
)
from viewmw.assembly import connect_redis

ROOT = Path(__file__).resolve().parent.parent
STORIES = range(1, 5)
USERS = range(501, 507)
# Rules whose windows the seeded traffic crosses often: several counted views per viewer and day.
LIMITS = Limits(
    max_views_per_session=3,
    session_seconds=2 * 3600,
    max_daily_views_per_user=6,
    one_view_per_day=False,
    view_cooldown_seconds=600,
)


@dataclass(frozen=True, slots=True)
class Offer:
    """One view of the seeded traffic: when, by whom, of what."""

    at: float
    user: int
    story: int

    @property
    def viewer(self) -> str:
        return f"user:{self.user}"


def seeded_traffic(views: int, seed: int = 11) -> list[Offer]:
    """``views`` views by a few users of a few stories, strictly later one after the other (whole
    seconds), about 30 hours in all: windows open and close, a day ends."""
    rng = random.Random(seed)
    at, offers = NOON_UTC, []
    for _ in range(views):
        at += rng.randint(1, 900)
        offers.append(Offer(at, rng.choice(USERS), rng.choice(STORIES)))
    return offers


async def tracking_state(client: aioredis.Redis) -> dict[bytes, object]:
    """Every session and daily counter: the rules' memory of which views counted. A session's
    expiry is left out: a replayed view's session is written at the replay, so it expires later
    than the same view's written live."""
    state: dict[bytes, object] = {}
    async for key in client.scan_iter(match="viewed:*", count=1000):
        state[key] = {
            field: value.rsplit(b":", 1)[0]
            for field, value in (await client.hgetall(key)).items()
            if field != b"~"
        }
    async for key in client.scan_iter(match="daily_views:*", count=1000):
        state[key] = await client.get(key)
    return state


async def pending(tracker: ViewTracker) -> dict[int, int]:
    return {s: await tracker.get_redis_view_count("story", s) for s in STORIES}


# Killed mid-traffic ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_views_offered_during_an_outage_are_decided_as_if_redis_had_stayed_up(
    pg_store: Store, real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    """240 seeded views over HTTP; the redis-server is killed after 80 and restarted after 160.

    The model is the same traffic on a second, healthy Redis, with the same clock. It is offered
    every view but those of the three that met the dead server before the breaker opened whose
    outcome is unknown (their header says ``unavailable``; the server was dead, so they never
    ran): a call that could not even open a connection was never sent, and is kept and
    replayed like the views after it.
    """
    await seed_stories(pg_store, STORIES)
    traffic = seeded_traffic(240)
    server = RedisProcess(free_port(), data_dir=tmp_path)  # keeps what it acknowledged
    server.start()
    # Generous request deadlines: this test is about outcomes, not about a loaded machine.
    settings = Settings(
        secret=SECRET,
        redis_url=server.url,
        database_url=DATABASE_URL,
        limits=LIMITS,
        redis_timeout=5.0,
        database_request_timeout=5.0,
    )
    clock, breaker_clock = FakeClock(), FakeClock(now=0.0)
    tracker = ViewTracker(connect_redis(settings), pg_store, settings, clock=clock)
    outage = ResilientTracker(
        tracker, Outbox(pg_store.engine), breaker=CircuitBreaker(clock=breaker_clock)
    )
    app = ViewTrackingMiddleware(
        site(), tracker=outage, routes=ROUTES, viewer=user_of, debug_header=DEBUG_HEADER
    )
    model_clock = FakeClock()
    model = ViewTracker(real_redis, None, settings.replace(redis_url=REDIS_URL), clock=model_clock)
    answers: list[str | None] = []
    try:
        try:
            async with served(app) as url, client_for(url) as client, asyncio.timeout(120):
                visits = Visits(client)
                for n, offer in enumerate(traffic):
                    if n == 80:
                        server.kill()
                    if n == 160:
                        server.start()
                        # Before any live view: the outage's views are older, and go first.
                        await recover(outage, breaker_clock)
                        assert await outbox_size(pg_store) == 0, "the replay left events behind"
                        kept = answers[80:160].count("1; queued")
                        assert await replay_markers(tracker.redis) == kept
                    clock.now = offer.at
                    seen = await visits.view(offer.story, user=str(offer.user))
                    answers.append(seen.counted)
                    if 80 <= n < 83 and seen.counted != "1; queued":
                        continue  # lost with its connection: never ran, the model never sees it
                    model_clock.now = offer.at
                    decided = await model.track_view("story", str(offer.story), offer.viewer)
                    if not 80 <= n < 160:
                        said = "1" if decided.counted else f"0; reason={decided.reason}"
                        assert seen.counted == said, f"view {n} ({offer}): {seen.counted!r}"
        finally:
            await outage.aclose()
            await tracker.redis.aclose()

        # Before the breaker opened: the call that met the dead server's closed connection is
        # unknown (unless the client saw it closed first); the next could not open a new
        # connection, so they were never sent, and were kept.
        assert set(answers[80:83]) <= {"0; reason=unavailable", "1; queued"}, answers[80:83]
        assert answers[81:83] == ["1; queued"] * 2, answers[80:83]
        assert answers[83:160] == ["1; queued"] * 77, answers[83:160]
        assert "0; reason=unavailable" not in answers[:80] + answers[160:]
        assert "1; queued" not in answers[:80] + answers[160:]
        async with aioredis.Redis.from_url(server.url) as restarted:
            replayed = ViewTracker(restarted, None, settings)
            expected = await pending(model)
            assert await pending(replayed) == expected, "the counts differ from the model's"
            assert await tracking_state(restarted) == await tracking_state(real_redis), (
                "the rules' state (sessions, daily counters) differs from the model's"
            )
            await ViewSync(restarted, pg_store, settings).run()
            assert await pending(replayed) == dict.fromkeys(STORIES, 0)
    finally:
        server.kill()
    assert await database_counts(pg_store, STORIES) == expected
    assert sum(expected.values()) >= 60, f"too few views counted to mean much: {expected}"


# A replayer killed -9 ---------------------------------------------------------------------------


async def write_outbox(store: Store, offers: list[Offer]) -> list[OutboxEvent]:
    outbox = Outbox(store.engine)
    events = [OutboxEvent.new("story", str(o.story), o.viewer, o.at) for o in offers]
    written = await asyncio.gather(*(outbox.add(event) for event in events))
    assert all(written), "the outbox refused events"
    return events


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [1, 2], ids=["first-chunk", "second-chunk"])
async def test_a_replayer_killed_between_redis_and_the_database_doubles_nothing(
    killed_after: int, pg_store: Store, real_redis: aioredis.Redis
) -> None:
    """A replayer process is killed -9 right after chunk ``killed_after`` reached Redis, before
    that chunk left the outbox; a second replay decides every event once."""
    await seed_stories(pg_store, STORIES)
    offers = seeded_traffic(60, seed=4)
    await write_outbox(pg_store, offers)
    settings = Settings()  # the worker's: default rules

    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "outage_replay_worker.py"),
        REDIS_URL,
        DATABASE_URL,
        "20",
        str(killed_after),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        assert worker.stdout is not None
        async with asyncio.timeout(60):
            line = await worker.stdout.readline()
        assert line == b"paused\n", line + await worker.stdout.read()
    finally:
        if worker.returncode is None:
            worker.kill()
        await worker.wait()
    left = 60 - 20 * (killed_after - 1)
    assert await outbox_size(pg_store) == left, "the kill did not land between Redis and delete"

    tracker = ViewTracker(real_redis, pg_store, settings)
    report = await Replayer(tracker, Outbox(pg_store.engine), chunk=20).replay()
    assert (report.events, report.already_replayed) == (left, 20), report
    assert await outbox_size(pg_store) == 0

    model_clock = FakeClock()
    model = ViewTracker(real_redis, None, settings.replace(key_prefix="model:"), clock=model_clock)
    for offer in offers:
        model_clock.now = offer.at
        await model.track_view("story", str(offer.story), offer.viewer)
    expected = await pending(model)
    assert await pending(tracker) == expected, "a replayed event was counted twice (or lost)"
    assert await replay_markers(real_redis) == 60, "every event is decided once, and remembered"

    await ViewSync(real_redis, pg_store, settings).run()
    assert await database_counts(pg_store, STORIES) == expected
    assert await pending(tracker) == dict.fromkeys(STORIES, 0)


# Findings: the outbox ---------------------------------------------------------------------------


async def test_a_queued_view_is_decided_in_the_second_it_was_offered(
    pg_store: Store, real_redis: aioredis.Redis
) -> None:
    settings = Settings(limits=Limits(one_view_per_day=False))  # cooldown 300 s
    clock = FakeClock()
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    assert (await tracker.track_view("story", "1", "user:1")).counted
    # 299.9996 s later: inside the cooldown (the rules see whole seconds: 299).
    await write_outbox(pg_store, [Offer(clock.now + 299.9996, 1, 1)])
    report = await Replayer(tracker, Outbox(pg_store.engine)).replay()
    assert report.counted == 0, "a view inside the cooldown counted because it was replayed"


async def test_shutdown_writes_the_views_whose_outbox_write_was_in_flight(
    pg_store: Store,
) -> None:
    outbox = Outbox(pg_store.engine)
    migration = Migration(DATABASE_URL)
    (offer,) = seeded_traffic(1)
    event = OutboxEvent.new("story", "1", offer.viewer, offer.at)
    await migration.lock("viewmw_outbox")
    add = asyncio.create_task(outbox.add(event))
    closing: asyncio.Task[None] | None = None
    try:
        # The writer took the event and its INSERT waits for the lock.
        await eventually(lambda: lock_waiters(pg_store, "viewmw_outbox"), 1, "writes waiting")
        assert outbox.in_memory == 1  # the group being written is held until it is known written
        closing = asyncio.create_task(outbox.aclose(write_seconds=30))
        for _ in range(10):
            await asyncio.sleep(0)  # let the shutdown begin while the write is still stuck
        await migration.release()
        async with asyncio.timeout(30):
            await closing
        assert await outbox_size(pg_store) == 1, "a view kept in memory was lost at shutdown"
        async with asyncio.timeout(5):
            assert await add, "the request that queued it was never answered"
    finally:
        tasks = [task for task in (add, closing) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await migration.aclose()
