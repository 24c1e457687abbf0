"""The deferred mode: answer without waiting for Redis, decide every view all the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from tests.asgi_support import drive, header, http_scope, plain_app
from tests.support import REDIS_URL, FakeClock
from viewmw import (
    CircuitBreaker,
    Outbox,
    ResilientTracker,
    Settings,
    Store,
    ViewTracker,
    ViewTrackingMiddleware,
)

ROUTES = {"/stories/{id:int}": "story"}


def middleware(tracker: object, *, deferred: bool) -> ViewTrackingMiddleware:
    return ViewTrackingMiddleware(
        plain_app(),
        tracker=tracker,  # type: ignore[arg-type]
        routes=ROUTES,
        debug_header="X-View-Counted",
        deferred=deferred,
    )


def visit(story: int, visitor: int) -> dict[str, object]:
    agent = f"Mozilla/5.0 deferred-visitor-{visitor}".encode()
    return http_scope(f"/stories/{story}", headers=[(b"user-agent", agent)])


# Two rounds: visitors 0-59 open stories 1-3, then visitors 30-89 do (30 repeats per story).
ROUNDS = [
    [(story, v) for v in visitors for story in (1, 2, 3)] for visitors in (range(60), range(30, 90))
]


async def test_counts_converge_to_the_default_modes_totals(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    totals = {}
    for prefix, deferred in (("default:", False), ("deferred:", True)):
        tracker = ViewTracker(real_redis, store, settings.replace(key_prefix=prefix), clock=clock)
        app = middleware(tracker, deferred=deferred)
        sent = []
        for traffic in ROUNDS:
            sent += await asyncio.gather(*(drive(app, visit(s, v)) for s, v in traffic))
            await tracker.drain()
        totals[prefix] = await tracker.get_view_counts("story", [1, 2, 3])
        debug = {header(messages[0], b"x-view-counted") for messages in sent}
        if deferred:
            # A content's first view in this process is answered the default way, once.
            assert b"0; reason=deferred" in debug
            assert debug <= {b"0; reason=deferred", b"1", b"0; reason=cooldown"}
    assert totals["default:"] == totals["deferred:"] == {"1": 90, "2": 90, "3": 90}


async def test_the_header_shows_the_latest_count_this_process_knows(
    real_redis: aioredis.Redis, settings: Settings, clock: FakeClock
) -> None:
    tracker = ViewTracker(real_redis, None, settings, clock=clock)
    app = middleware(tracker, deferred=True)
    shown = []
    for visitor in range(4):
        sent = await drive(app, visit(7, visitor))
        shown.append(header(sent[0], b"x-view-count"))
        await tracker.drain()  # the next request comes after this view's batch was decided
    # The first view of a content waits once; later ones show the count before their own view.
    assert shown == [b"1", b"1", b"2", b"3"]
    assert await tracker.get_view_count("story", 7) == 4


async def test_shutdown_sends_every_queued_view(tmp_path: Path, settings: Settings) -> None:
    owned = ViewTrackingMiddleware(
        plain_app(),
        routes=ROUTES,
        settings=settings.replace(
            redis_url=REDIS_URL, database_url=f"sqlite:///{tmp_path}/deferred.sqlite3"
        ),
        deferred=True,
    )
    await owned.startup()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.flushdb()
        await asyncio.gather(*(drive(owned, visit(9, v)) for v in range(50)))
        await owned.aclose()  # nobody waited for these views: the shutdown sends them
        assert await client.get("story:views:9") == b"50"
    finally:
        await client.aclose()


async def test_an_outage_takes_the_same_path_as_the_default_mode(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    resilient = ResilientTracker(
        ViewTracker(real_redis, store, settings, clock=clock),
        Outbox(store.engine),
        breaker=CircuitBreaker(reset_seconds=30.0, clock=FakeClock(now=0.0)),
    )
    app = middleware(resilient, deferred=True)
    try:
        resilient.breaker.trip()  # Redis is failing
        for visitor in range(5):
            sent = await drive(app, visit(11, visitor))
            assert sent[0]["status"] == 200
        await resilient.drain()
    finally:
        await resilient.aclose()
    assert await Outbox(store.engine).counts("story", ["11"]) == {"11": 5}
    assert await real_redis.get("story:views:11") is None
