"""A Redis outage from start to end: a private redis-server killed mid-traffic and restarted.

Every request keeps getting the app's own response; views accepted while Redis is down are counted
in the database; after recovery the totals are exact: views accepted = database + pending.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.asgi_support import RedisProcess, drive, free_port, header, http_scope, plain_app
from tests.support import FakeClock
from viewmw import (
    CircuitBreaker,
    DatabaseFallback,
    Limits,
    ResilientTracker,
    Settings,
    Store,
    ViewSync,
    ViewTracker,
    ViewTrackingMiddleware,
)
from viewmw.middleware import connect_redis
from viewmw.outage.breaker import BreakerState

APP_BODY = b"the app's own page"
STORIES = range(1, 6)


class Outage:
    """The app, the middleware and the servers of one outage."""

    def __init__(self, store: Store, server: RedisProcess) -> None:
        self.server = server
        self.store = store
        self.settings = Settings(
            redis_url=server.url,
            secret="outage-secret-0123456789",
            redis_timeout=0.2,
            # Every view of a new viewer counts, in Redis and in the fallback alike.
            limits=Limits(
                max_views_per_session=0, max_daily_views_per_user=0, view_cooldown_seconds=0
            ),
        )
        self.breaker_clock = FakeClock(now=0.0)
        self.redis = connect_redis(self.settings)
        self.tracker = ViewTracker(self.redis, store, self.settings, clock=FakeClock())
        self.fallback = DatabaseFallback(store, flush_seconds=3600)  # flushed by the test
        self.resilient = ResilientTracker(
            self.tracker,
            self.fallback,
            breaker=CircuitBreaker(failure_threshold=3, reset_seconds=5, clock=self.breaker_clock),
        )
        self.app = ViewTrackingMiddleware(
            plain_app(body=APP_BODY),
            tracker=self.resilient,  # type: ignore[arg-type]
            # A type without a table of its own: no rows to seed.
            routes={"/stories/{id:int}": "task"},
            debug_header="X-View-Counted",
        )
        self.accepted = dict.fromkeys(map(str, STORIES), 0)
        self.viewers = 0

    async def traffic(self, requests: int) -> list[bytes | None]:
        """``requests`` views by new viewers, round-robin over the stories; every response must
        be the app's own. Returns the debug header of each."""
        outcomes = []
        for n in range(requests):
            self.viewers += 1
            story = str(STORIES[n % len(STORIES)])
            agent = f"Mozilla/5.0 outage-viewer-{self.viewers}".encode()
            sent = await drive(
                self.app, http_scope(f"/stories/{story}", headers=[(b"user-agent", agent)])
            )
            assert (sent[0]["status"], sent[1]["body"]) == (200, APP_BODY)
            counted = header(sent[0], b"x-view-counted")
            if counted == b"1":
                self.accepted[story] += 1
            outcomes.append(counted)
        return outcomes

    async def totals(self) -> dict[str, int]:
        """database + pending (+ syncing) per story."""
        return {
            story: await self.tracker.get_database_view_count("task", story)
            + await self.tracker.get_redis_view_count("task", story)
            for story in self.accepted
        }


@pytest.fixture
async def outage(store: Store) -> AsyncIterator[Outage]:
    server = RedisProcess(free_port())
    server.start()
    world = Outage(store, server)
    yield world
    await world.resilient.aclose()
    await world.redis.aclose()
    server.kill()


async def test_views_during_an_outage_reach_the_database_and_totals_stay_exact(
    outage: Outage,
) -> None:
    assert await outage.traffic(10) == [b"1"] * 10  # on Redis

    outage.server.kill()
    during = await outage.traffic(40)
    # The first failures open the breaker and are not counted (the script may have run); after
    # that every new viewer is counted by the database fallback, without touching Redis.
    assert during[:3] == [b"0; reason=unavailable"] * 3
    assert during[3:] == [b"1"] * 37
    assert outage.resilient.breaker.state is BreakerState.OPEN
    assert await outage.fallback.flush() == 37

    outage.server.start()  # empty: a restarted Redis without persistence lost its pending views
    outage.breaker_clock.advance(5)  # the back-off is over: the next request probes Redis
    after = await outage.traffic(10)
    assert after == [b"1"] * 10
    assert outage.resilient.breaker.state is BreakerState.CLOSED
    assert outage.resilient._reconciling is not None
    await outage.resilient._reconciling  # the fallback's contents are re-read from the database

    # The 10 views pending in the killed server are gone with it; everything else is exact.
    lost_with_the_server = {story: 2 for story in outage.accepted}
    expected = {s: outage.accepted[s] - lost_with_the_server[s] for s in outage.accepted}
    assert await outage.totals() == expected
    shown = await outage.resilient.get_view_counts("task", list(outage.accepted))
    assert shown == expected  # the cached counts were refreshed, not stale

    await ViewSync(outage.redis, outage.store, outage.settings).run()
    for story, count in expected.items():
        assert await outage.tracker.get_database_view_count("task", story) == count
        assert await outage.tracker.get_redis_view_count("task", story) == 0


async def test_redis_that_hangs_is_handled_the_same_way(store: Store, monkeypatch: Any) -> None:
    from tests.asgi_support import StubRedis

    async with StubRedis(None) as stub:  # accepts connections, never answers
        server = RedisProcess(free_port())
        server.url = stub.url
        world = Outage(store, server)
        try:
            during = await world.traffic(8)
            assert during[:3] == [b"0; reason=unavailable"] * 3
            assert during[3:] == [b"1"] * 5
            assert await world.fallback.flush() == 5
            assert sum([await store.read_count("task", s) for s in world.accepted]) == 5
        finally:
            await world.resilient.aclose()
            await world.redis.aclose()
