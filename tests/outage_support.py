"""Helpers for the outage tests over real HTTP: a small site, its viewers, and what they saw."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from tests.conftest import stories
from tests.support import FakeClock
from viewmw import ResilientTracker, Store, ViewTracker

ROUTES = {"/stories/{id:int}": "story"}
DEBUG_HEADER = "X-View-Counted"
SECRET = "outage-http-secret-0123456789"
PAGE = "the app's own page"
# A browser's user agent, so that crawler detection lets the request count.
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def user_of(scope: Scope) -> str | None:
    """The ``viewer=`` callable of the test sites: the ``x-user`` header names the user."""
    for name, value in scope["headers"]:
        if name == b"x-user":
            return str(value.decode())
    return None


def burn_cpu(seconds: float) -> None:
    """Keep the calling thread busy for ``seconds`` of its own CPU time (a template, a PDF…)."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def site(before_report: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """A site with tracked story pages and an untracked ``/report`` that burns 0.4 s of CPU on
    the event loop, after awaiting ``before_report`` (a test's cue)."""

    async def story(request: Request) -> PlainTextResponse:
        return PlainTextResponse(PAGE)

    async def report(request: Request) -> PlainTextResponse:
        if before_report is not None:
            await before_report()
        burn_cpu(0.4)
        return PlainTextResponse("a report that took a while")

    return Starlette(routes=[Route("/stories/{id:int}", story), Route("/report", report)])


@dataclass(frozen=True, slots=True)
class Seen:
    """What one tracked response said."""

    story: int
    status: int
    body: str
    counted: str | None
    count: int | None

    @classmethod
    def of(cls, story: int, response: httpx.Response) -> Seen:
        count = response.headers.get("x-view-count")
        return cls(
            story,
            response.status_code,
            response.text,
            response.headers.get(DEBUG_HEADER),
            None if count is None else int(count),
        )


class Visits:
    """HTTP clients for one test site, and every tracked response they got.

    Several clients stand for several browsers; they also keep each connection pool small (one
    httpx pool with hundreds of connections costs more CPU than the site it is testing).
    """

    def __init__(self, *clients: httpx.AsyncClient) -> None:
        self.clients = itertools.cycle(clients)
        self.seen: list[Seen] = []

    async def view(self, story: int, *, user: str | None = None, agent: str = BROWSER) -> Seen:
        """GET ``/stories/{story}`` as ``user`` (anonymous: by client address and ``agent``)."""
        headers = {"user-agent": agent}
        if user is not None:
            headers["x-user"] = user
        response = await next(self.clients).get(f"/stories/{story}", headers=headers)
        seen = Seen.of(story, response)
        assert (seen.status, seen.body) == (200, PAGE), f"the app's own page did not go out: {seen}"
        self.seen.append(seen)
        return seen

    async def together(self, views: Iterable[tuple[int, str | None]]) -> list[Seen]:
        """Send the ``(story, user)`` views all at once; their responses, in that order."""
        return list(await asyncio.gather(*(self.view(story, user=user) for story, user in views)))


@contextlib.asynccontextmanager
async def browsers(url: str, count: int = 20) -> AsyncIterator[Visits]:
    """``count`` clients of the site at ``url``, closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(url)) for _ in range(count)]
        yield Visits(*clients)


def client_for(url: str, connections: int = 100) -> httpx.AsyncClient:
    """A client for many simultaneous requests; its timeout is a guard, not an expectation."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=url, limits=limits, timeout=60.0, headers={"user-agent": BROWSER}
    )


def headers_of(seen: Iterable[Seen]) -> dict[str, int]:
    """How many responses carried each debug header value."""
    tally: dict[str, int] = {}
    for one in seen:
        tally[str(one.counted)] = tally.get(str(one.counted), 0) + 1
    return tally


async def seed_stories(store: Store, ids: Iterable[int]) -> None:
    """Rows for the stories (a mapped table drops the counts of rows that do not exist)."""
    async with store.engine.begin() as connection:
        await connection.execute(stories.insert(), [{"id": i, "view_count": 0} for i in ids])


async def database_counts(store: Store, ids: Iterable[int]) -> dict[int, int]:
    """``stories.view_count`` per id."""
    wanted = list(ids)
    query = select(stories.c.id, stories.c.view_count).where(stories.c.id.in_(wanted))
    async with store.engine.connect() as connection:
        found = {row.id: row.view_count for row in await connection.execute(query)}
    return {i: found.get(i, 0) for i in wanted}


async def outbox_size(store: Store) -> int:
    """Events waiting in the outage outbox."""
    async with store.engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM viewmw_outbox"))).scalar())


async def totals(tracker: ViewTracker, ids: Iterable[int]) -> dict[int, int]:
    """database + pending + syncing per story, read by ``tracker`` (Redis must be up)."""
    details = await tracker.get_view_count_details("story", [str(i) for i in ids])
    result = {}
    for content_id, count in details.items():
        assert count is not None, f"the count of story {content_id} could not be read"
        result[int(content_id)] = count.total
    return result


async def quiet(tracker: ViewTracker) -> None:
    """Wait until every script call ``tracker`` queued has been answered (late ones included), so
    that Redis holds their outcome before the test reads it."""
    await tracker.drain()


async def eventually(
    read: Callable[[], Awaitable[int]], expected: int, what: str, seconds: float = 30.0
) -> None:
    """Wait, at most ``seconds``, until ``read()`` returns ``expected`` (background work that the
    test cannot await, such as a write its request stopped waiting for)."""
    value = None
    for _ in range(int(seconds / 0.05)):
        value = await read()
        if value == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: {value}, expected {expected} within {seconds:.0f} s")


async def lock_waiters(store: Store, table: str) -> int:
    """Sessions of this database waiting for a lock on ``table``."""
    query = text(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = CAST(:table AS regclass) "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    async with store.engine.connect() as connection:
        return int((await connection.execute(query, {"table": table})).scalar_one())


class Migration:
    """Another connection that holds tables in ``ACCESS EXCLUSIVE`` mode inside an open
    transaction, as a schema migration does; every other reader and writer of them waits."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url, poolclass=NullPool)
        self.connection: AsyncConnection | None = None

    async def lock(self, *tables: str) -> None:
        """Lock ``tables`` (in the transaction already open, if any)."""
        if self.connection is None:
            self.connection = await self.engine.connect()
            await self.connection.begin()
        await self.connection.execute(
            text(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        )

    async def release(self) -> None:
        """End the transaction: every lock is released."""
        if self.connection is not None:
            connection, self.connection = self.connection, None
            await connection.rollback()
            await connection.close()

    async def aclose(self) -> None:
        await self.release()
        await self.engine.dispose()


async def recover(tracker: ResilientTracker, breaker_clock: FakeClock) -> None:
    """Redis is back: let the breaker's back-off pass and probe with a count read until it
    closes, then replay the outbox to the end (the breaker's own background replay may run at
    the same time; the replay markers make that safe)."""
    for _ in range(10):  # stale pooled connections may fail a probe or two
        breaker_clock.advance(120)
        await tracker.get_view_count("story", "1")
        if tracker.breaker.is_closed:
            break
    assert tracker.breaker.is_closed, f"the breaker stayed {tracker.breaker.state}"
    assert tracker.replayer is not None
    await tracker.replayer.replay()


async def replay_markers(client: aioredis.Redis) -> int:
    """Outage events Redis has decided (each leaves a marker)."""
    return len([key async for key in client.scan_iter(match="viewmw:replayed:*", count=1000)])
