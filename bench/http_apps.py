"""The apps the HTTP benchmark serves with uvicorn: one content site, four ways.

``bare``: no view counting. ``tracked``: wrapped in ViewTrackingMiddleware (``/stories/{id}`` is
tracked, ``/about`` is not). ``naive``: the original service's approach, written here for
comparison — several sequential Redis commands per view, then an SQL read for the count.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from viewmw import Settings, ViewTrackingMiddleware


async def story(request: Request) -> HTMLResponse:
    story_id = request.path_params["id"]
    return HTMLResponse(f"<h1>Story {story_id}</h1><p>Once upon a time…</p>")


async def about(request: Request) -> HTMLResponse:
    return HTMLResponse("<h1>About</h1>")


def site() -> Starlette:
    """The content site without view counting."""
    return Starlette(routes=[Route("/stories/{id:int}", story), Route("/about", about)])


class NaiveViewCounter:
    """The original approach: check and update each rule with its own command, then read SQL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.redis = aioredis.Redis.from_url(os.environ["VIEWMW_REDIS_URL"])
        self.engine = create_async_engine(Settings.from_env().database_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/stories/"):
            await self.app(scope, receive, send)
            return
        story_id = path.rsplit("/", 1)[-1]
        headers = dict(scope["headers"])
        viewer = f"anon:{hash((scope['client'][0], headers.get(b'user-agent'))) & 0xFFFFFFFF}"
        day = datetime.now(UTC).date().isoformat()
        r = self.redis
        cooldown = f"cooldown:{viewer}:story:{story_id}"
        viewed = f"viewed:{viewer}:story:{story_id}"
        daily = f"daily_views:{viewer}:{day}"
        seen_today = f"daily_viewed:{viewer}:story:{story_id}:{day}"
        allowed = (
            not await r.exists(cooldown)
            and not await r.exists(seen_today)
            and int(await r.get(viewed) or 0) < 3
            and int(await r.get(daily) or 0) < 100
        )
        if allowed:
            await r.incr(f"story:views:{story_id}")
            await r.set(cooldown, 1, ex=300)
            await r.set(seen_today, 1, ex=86400)
            await r.incr(viewed)
            await r.expire(viewed, 86400)
            await r.incr(daily)
            await r.expire(daily, 86400)
        async with self.engine.connect() as connection:
            stored = await connection.scalar(
                text("SELECT view_count FROM stories WHERE id = :id"), {"id": int(story_id)}
            )
        count = int(stored or 0) + int(await r.get(f"story:views:{story_id}") or 0)

        async def send_with_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-view-count", str(count).encode()))
            await send(message)

        await self.app(scope, receive, send_with_count)


bare = site()
tracked = ViewTrackingMiddleware(site(), routes={"/stories/{id:int}": "story"})
naive = NaiveViewCounter(site())
