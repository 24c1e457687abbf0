"""The apps the HTTP benchmark serves with uvicorn (``--factory``): one content site, several ways.

Each function at the bottom builds one variant; only that one is built in its server process.
``bare``: no view counting. ``tracked``: wrapped in ViewTrackingMiddleware (``/stories/{id}`` is
tracked, ``/about`` is not). ``tracked_deferred``: the same in deferred mode. ``do_nothing``: the
middleware with a tracker that does no work, i.e. the middleware's own cost. ``incr_counter``: the
simplest counter anyone would write, one ``INCR`` per view and no rules. ``naive``: the original
service's approach — several sequential Redis commands per view, then an SQL read for the count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from viewmw import Settings, TrackResult, ViewCount, ViewTrackingMiddleware

STORY_ROUTES = {"/stories/{id:int}": "story"}


async def story(request: Request) -> HTMLResponse:
    story_id = request.path_params["id"]
    return HTMLResponse(f"<h1>Story {story_id}</h1><p>Once upon a time…</p>")


async def about(request: Request) -> HTMLResponse:
    return HTMLResponse("<h1>About</h1>")


def site() -> Starlette:
    """The content site without view counting."""
    return Starlette(routes=[Route("/stories/{id:int}", story), Route("/about", about)])


def _with_count(send: Send, count: int) -> Send:
    """``send``, adding the count header to the start message."""

    async def send_with_count(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", []).append((b"x-view-count", str(count).encode()))
        await send(message)

    return send_with_count


class NullTracker:
    """The tracker contract the middleware uses (``RequestTracker``) with nothing behind it: every
    view is counted and the count is fixed. No Redis, no database."""

    _COUNT = ViewCount(database=41, pending=1, syncing=0)
    _COUNTED = TrackResult(counted=True, reason=None, count=_COUNT)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = time.time

    async def track_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> TrackResult:
        """Counted, always."""
        return self._COUNTED

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        """The fixed count (the deferred mode's call)."""
        return self._COUNT.total

    async def track_valid_crawler_view(self, content_type: str, content_id: str) -> TrackResult:
        """Not counted; the fixed count."""
        return TrackResult(counted=False, reason=None, count=self._COUNT)

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """The fixed count for every id."""
        return {str(content_id): self._COUNT for content_id in content_ids}


class IncrCounter:
    """The simplest counter anyone would write: one ``INCR`` per view of a story, no rules; its
    reply is the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.redis = aioredis.Redis.from_url(os.environ["VIEWMW_REDIS_URL"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/stories/"):
            await self.app(scope, receive, send)
            return
        count = await self.redis.incr(f"views:story:{path[9:]}")
        await self.app(scope, receive, _with_count(send, count))


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
        await self.app(scope, receive, _with_count(send, count))


def bare() -> ASGIApp:
    return site()


def tracked() -> ASGIApp:
    return ViewTrackingMiddleware(site(), routes=STORY_ROUTES)


def tracked_deferred() -> ASGIApp:
    return ViewTrackingMiddleware(site(), routes=STORY_ROUTES, deferred=True)


def do_nothing() -> ASGIApp:
    return ViewTrackingMiddleware(
        site(), tracker=NullTracker(Settings.from_env()), routes=STORY_ROUTES
    )


def incr_counter() -> ASGIApp:
    return IncrCounter(site())


def naive() -> ASGIApp:
    return NaiveViewCounter(site())
