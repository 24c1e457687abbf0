"""A small content site whose views viewmw counts: stories, fantasies, tasks and outcomes.

Run it with ``uvicorn examples.site:app`` or ``python -m examples.site`` (127.0.0.1, port from
``PORT``, default 8000). Settings come from ``VIEWMW_*`` variables; with none set it runs on an
in-process fakeredis and a SQLite file in the current directory. Send ``X-Demo-User: alice`` to
browse as a signed-in user; every response to a detail page carries ``X-View-Count`` and, for the
demo, ``X-View-Counted``. A detail page decides its view with ``track(request)`` before it renders,
so it shows the same count as the header, its own view included, and a table of its views per
day. ``/trending`` ranks the week's most viewed items (today's views as they happen), and
``/viewmw/`` mounts the operator statistics page (unprotected here; never in production).
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import MetaData, Table, insert, select
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route

from viewmw import (
    DayCount,
    Period,
    RequestView,
    Settings,
    StatsPage,
    Store,
    ViewStats,
    content_table,
    track,
    view_counts,
)
from viewmw.assembly import build_tracker, close_clients
from viewmw.mapping import record_mapping
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox
from viewmw.routes import RouteSpec

logger = logging.getLogger("examples.site")
T = TypeVar("T")

content_metadata = MetaData()
stories = content_table(content_metadata, "stories")
fantasies = content_table(content_metadata, "fantasies")
# Stories and fantasies keep their counts in their own tables; tasks and outcomes, which have
# none, use viewmw's generic table.
CONTENT_TABLES = {"story": stories.c.view_count, "fantasy": fantasies.c.view_count}


@dataclass(frozen=True, slots=True)
class Section:
    """One kind of content: its content type, URL segment, heading and items (id -> title)."""

    content_type: str
    segment: str
    heading: str
    items: Mapping[str, str]


SECTIONS = (
    Section(
        "story",
        "stories",
        "Stories",
        {"1": "The Lighthouse Keeper", "2": "A Map of Small Rivers", "3": "Night Train"},
    ),
    Section(
        "fantasy",
        "fantasies",
        "Fantasies",
        {"1": "The Glass Dragon", "2": "Salt and Crowns"},
    ),
    Section(
        "task",
        "tasks",
        "Tasks",
        {"write-docs": "Write the docs", "fix-the-sync": "Fix the sync", "ship-it": "Ship it"},
    ),
    Section(
        "outcome",
        "outcomes",
        "Outcomes",
        {"1": "Docs published", "2": "Sync verified"},
    ),
)
SECTION_BY_SEGMENT = {section.segment: section for section in SECTIONS}

ROUTES: dict[str, RouteSpec] = {
    "/stories/{id:int}": "story",
    "/fantasies/{id:int}": "fantasy",
    "/tasks/{slug}": ("task", "slug"),
    "/outcomes/{id:int}": "outcome",
}
"""Which pages show which content, for the middleware (tasks are addressed by slug)."""

SEEDED_TABLES: tuple[tuple[Table, str], ...] = ((stories, "story"), (fantasies, "fantasy"))


class DemoUserBackend(AuthenticationBackend):
    """Demo only: trusts an ``X-Demo-User`` header. Never deploy this."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-demo-user", "").strip()
        if not name:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


def create_app(settings: Settings | None = None) -> Starlette:
    """The site, on ``settings`` (default: :meth:`Settings.from_env`)."""
    settings = settings or Settings.from_env()
    redis_tracker = build_tracker(settings, CONTENT_TABLES)
    store = redis_tracker.store
    assert store is not None
    # Keeps views offered while Redis is out of reach (in the database outbox) and replays them.
    tracker = ResilientTracker(redis_tracker, Outbox(store.engine))
    # Period questions (trending, views per day) from the history plus what Redis still holds.
    stats = ViewStats.from_tracker(redis_tracker)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.create_tables()
        # Tell the sync where this app counts each type (it refuses to move them elsewhere).
        await record_mapping(redis_tracker.redis, redis_tracker.keys, store)
        await seed(store)
        await tracker.startup()
        try:
            yield
        finally:
            await tracker.aclose()  # writes outbox events still in memory
            await close_clients(redis_tracker)

    async def index(request: Request) -> HTMLResponse:
        links = "".join(
            f'<li><a href="/{s.segment}">{html.escape(s.heading)}</a></li>' for s in SECTIONS
        )
        extra = (
            '<li><a href="/trending">Trending this week</a></li>'
            '<li><a href="/viewmw/">Operator statistics</a> (demo: unprotected)</li>'
        )
        return _page("viewmw demo", f"<ul>{links}{extra}</ul>")

    async def trending(request: Request) -> HTMLResponse:
        # The most viewed items of the last 7 days, today's views included as they happen.
        week = Period.last_days(7)
        tops = await _bounded(
            asyncio.gather(*(stats.top(s.content_type, week, limit=5) for s in SECTIONS)),
            settings,
        )
        parts = []
        for section, top in zip(SECTIONS, tops or [[] for _ in SECTIONS], strict=True):
            rows = "".join(
                f'<li><a href="/{section.segment}/{html.escape(item_id)}">'
                f"{html.escape(section.items.get(item_id, item_id))}</a> — {_views(views)}</li>"
                for item_id, views in top
            )
            parts.append(
                f"<h2>{html.escape(section.heading)}</h2>"
                + (f"<ol>{rows}</ol>" if rows else "<p>No views this week yet.</p>")
            )
        if tops is None:
            parts = ["<p>Trending is unavailable right now.</p>"]
        return _page("Trending this week", "".join(parts))

    async def section_list(request: Request) -> HTMLResponse:
        section = SECTION_BY_SEGMENT.get(request.path_params["segment"])
        if section is None:
            return _page("Not found", "<p>No such section.</p>", status_code=404)
        # Every count on the page comes from one batch read, with the middleware's tracker.
        counts = await _bounded(
            view_counts(request, section.content_type, list(section.items)), settings
        )
        rows = "".join(
            f'<li><a href="/{section.segment}/{html.escape(item_id)}">{html.escape(title)}</a>'
            f" — {_views((counts or {}).get(item_id))}</li>"
            for item_id, title in section.items.items()
        )
        return _page(section.heading, f"<ul>{rows}</ul>")

    async def detail(request: Request) -> HTMLResponse:
        section = SECTION_BY_SEGMENT[request.url.path.split("/")[1]]
        item_id = str(request.path_params.get("id", request.path_params.get("slug")))
        title = section.items.get(item_id)
        if title is None:
            return _page("Not found", "<p>No such item.</p>", status_code=404)
        # Decided now, once the item is known to exist: the page shows the count that includes
        # this visit, the number X-View-Count carries (the middleware does not offer it again).
        view = await track(request)
        days = await _bounded(
            stats.by_day(section.content_type, item_id, Period.last_days(7)), settings
        )
        body = (
            f"<p>{_views(view.count)} ({_visit(view)}).</p>"
            f"{_day_table(days)}"
            f'<p><a href="/{section.segment}">All {html.escape(section.heading.lower())}</a></p>'
        )
        return _page(title, body)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/stories/{id:int}", detail),
            Route("/fantasies/{id:int}", detail),
            Route("/tasks/{slug}", detail),
            Route("/outcomes/{id:int}", detail),
            Route("/trending", trending),
            # Operator statistics. Demo only: a real app puts its own auth in front of it.
            Mount("/viewmw", app=StatsPage(stats, tracker)),
            Route("/{segment}", section_list),
        ],
        middleware=[
            Middleware(
                ViewTrackingMiddleware,
                tracker=tracker,
                routes=ROUTES,
                debug_header="X-View-Counted",
            ),
            Middleware(AuthenticationMiddleware, backend=DemoUserBackend()),
        ],
        lifespan=lifespan,
    )
    app.state.tracker = tracker  # for code that reads counts itself
    return app


async def seed(store: Store) -> None:
    """Insert the demo stories and fantasies that are not in their tables yet."""
    async with store.engine.begin() as connection:
        for table, content_type in SEEDED_TABLES:
            wanted = {int(item_id) for item_id in _section(content_type).items}
            present = set((await connection.execute(select(table.c.id))).scalars())
            missing = sorted(wanted - present)
            if missing:
                await connection.execute(insert(table), [{"id": i} for i in missing])


def _section(content_type: str) -> Section:
    return next(s for s in SECTIONS if s.content_type == content_type)


async def _bounded(read: Awaitable[T], settings: Settings) -> T | None:
    """A count read that gives up rather than fail the page: counts are decoration here."""
    try:
        async with asyncio.timeout(settings.redis_timeout + settings.database_timeout):
            return await read
    except Exception:
        logger.warning("reading view counts failed; the page shows none", exc_info=True)
        return None


def _views(count: int | None) -> str:
    if count is None:
        return "views unavailable"
    return f"{count} view" if count == 1 else f"{count} views"


def _day_table(days: list[DayCount] | None) -> str:
    """The last 7 days' views and distinct viewers, a row per day."""
    if days is None:
        return "<p>Views per day are unavailable right now.</p>"
    rows = "".join(
        f"<tr><td>{day.day.isoformat()}</td><td>{day.views}</td>"
        f"<td>{'' if day.unique_viewers is None else day.unique_viewers}</td></tr>"
        for day in days
    )
    return (
        "<table><caption>Last 7 days</caption>"
        "<tr><th>day</th><th>views</th><th>viewers</th></tr>"
        f"{rows}</table>"
    )


def _visit(view: RequestView) -> str:
    if view.counted:
        return "this visit included"
    if view.queued:
        return "this visit waits to be counted"
    return f"this visit not counted: {html.escape(str(view.reason))}"


def _page(title: str, body: str, *, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>{body}",
        status_code=status_code,
    )


app = create_app()
"""The site on the ``VIEWMW_*`` settings of this process."""


def main() -> None:
    """Serve the site with uvicorn on 127.0.0.1, port ``PORT`` (default 8000)."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
