"""Through the middleware (and its default ResilientTracker): an id the mapped table cannot hold
is answered ``invalid_id``, is not counted, and never counts against the circuit breaker."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis
from sqlalchemy import MetaData
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.support import REDIS_URL
from viewmw import Settings, content_table
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.outage.failover import ResilientTracker

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


async def test_an_id_the_table_cannot_hold_is_invalid_id_and_spares_the_breaker(
    real_redis: aioredis.Redis, tmp_path: object
) -> None:
    stories = content_table(MetaData(), "stories")
    app = Starlette(routes=[Route("/s/{id}", lambda request: PlainTextResponse("ok"))])
    settings = Settings(
        secret="test-secret-0123456789",
        redis_url=REDIS_URL,
        redis_timeout=5.0,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/ids.sqlite3",
    )
    middleware = ViewTrackingMiddleware(
        app,
        settings=settings,
        routes={"/s/{id}": "story"},
        content_tables={"story": stories.c.view_count},
        debug_header="x-debug",
    )
    await middleware.startup()
    try:
        assert isinstance(middleware.tracker, ResilientTracker)
        transport = httpx.ASGITransport(middleware)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://site", headers={"user-agent": BROWSER}
        ) as site:
            for path in ["/s/" + "9" * 20, "/s/07", "/s/-0"] * 3:
                response = await site.get(path)
                assert (response.text, response.headers["x-debug"]) == (
                    "ok",
                    "0; reason=invalid_id",
                )
                assert "x-view-count" not in response.headers
            counted = await site.get("/s/9223372036854775807")
            middleware.tracker.breaker.trip()  # Redis failing: the outbox path refuses it too
            queued = await site.get("/s/" + "9" * 20)
        assert counted.headers["x-debug"] == "1"
        assert queued.headers["x-debug"] == "0; reason=invalid_id"
        assert middleware.tracker.breaker.opened_count == 1  # the trip above, nothing else
        assert await real_redis.keys("story:views:*") == [b"story:views:9223372036854775807"]
    finally:
        await middleware.aclose()
