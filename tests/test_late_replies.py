"""Late is not failed: a view whose request stopped waiting is still decided by Redis' script."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tests.asgi_support import RedisProcess, free_port
from tests.outage_support import quiet
from tests.support import FakeClock
from viewmw import Settings, ViewTracker
from viewmw.assembly import connect_redis


@pytest.mark.slow
async def test_a_view_whose_deadline_passed_while_queued_is_still_decided() -> None:
    """Four pipelines wait on Redis (writes paused, as a busy Redis or a busy loop would hold
    them); a fifth view queues behind them and its request's deadline passes. Its outcome is
    unknown to the request, but the view must still reach the script once Redis answers."""
    server = RedisProcess(free_port())  # CLIENT PAUSE would stall every test run on a shared one
    server.start()
    settings = Settings(redis_url=server.url)  # the default 0.25 s deadline
    tracker = ViewTracker(connect_redis(settings), None, settings, clock=FakeClock())
    control = aioredis.Redis.from_url(server.url)
    views: list[asyncio.Task[object]] = []
    try:
        assert (await tracker.track_view("story", "1", "user:100")).counted  # scripts loaded
        await control.client_pause(60_000, all=False)  # scripts wait; other commands answer
        for user in range(1, 6):
            views.append(asyncio.create_task(tracker.track_view("story", "1", f"user:{user}")))
            for _ in range(10):
                await asyncio.sleep(0)  # one pipeline per view: four in flight, then a queue
        outcomes = await asyncio.gather(*views, return_exceptions=True)
        assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
        await control.client_unpause()
        async with asyncio.timeout(30):
            await quiet(tracker)
        assert await control.get("story:views:1") == b"6", "a late view was never decided"
    finally:
        for view in views:
            view.cancel()
        await asyncio.gather(*views, return_exceptions=True)
        await control.aclose()
        await tracker.redis.aclose()
        server.kill()
