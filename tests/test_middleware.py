"""ViewTrackingMiddleware against the real Redis: what counts, the header, mounting, streaming."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Message, Receive, Scope, Send

from tests.asgi_support import (
    CLIENT_HOST,
    USER_AGENT,
    assert_no_personal_data,
    drive,
    header,
    http_scope,
    plain_app,
)
from tests.support import REDIS_URL, FakeClock
from viewmw import ConfigurationError, Limits, Period, Settings, Store, ViewStats, ViewTracker
from viewmw.assembly import connect_redis
from viewmw.identity import ViewerIdentity
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.outage.failover import ResilientTracker

ROUTES: dict[str, Any] = {
    "/stories/{id:int}": "story",
    "/fantasies/{id:int}": "fantasy",
    "/tasks/{slug}": ("task", "slug"),
    "/missing/{id:int}": "story",
    "/broken/{id:int}": "story",
    "/moved/{id:int}": "story",
    "/stream/{id:int}": "story",
}
BROWSER = {"user-agent": USER_AGENT}
SHARED_RESPONSE = PlainTextResponse("shared", headers={"x-app": "kept"})


class HeaderUser(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


async def page(request: Request) -> Response:
    params = request.path_params
    return PlainTextResponse(f"page {params.get('id', params.get('slug'))}")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(5):
            yield f"chunk {n}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


def site_routes() -> list[Route]:
    return [
        Route("/stories/{id:int}", page, methods=["GET", "HEAD", "POST"]),
        Route("/fantasies/{id:int}", page),
        Route("/tasks/{slug}", page),
        Route("/missing/{id:int}", lambda r: PlainTextResponse("gone", status_code=404)),
        Route("/broken/{id:int}", lambda r: PlainTextResponse("oops", status_code=500)),
        Route("/moved/{id:int}", lambda r: RedirectResponse("/stories/1")),
        Route("/stream/{id:int}", stream),
        Route("/shared/{id:int}", lambda r: SHARED_RESPONSE),
    ]


def make_site(tracker: ViewTracker, **options: Any) -> Starlette:
    options = {"debug_header": "X-View-Counted", "routes": ROUTES, **options}
    return Starlette(
        routes=site_routes(),
        middleware=[
            Middleware(ViewTrackingMiddleware, tracker=tracker, **options),
            Middleware(AuthenticationMiddleware, backend=HeaderUser()),
        ],
    )


def client_for(app: Any, **transport: Any) -> httpx.AsyncClient:
    transport.setdefault("client", (CLIENT_HOST, 4321))
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, **transport), base_url="http://testserver"
    )


@pytest.fixture
async def site(tracker: ViewTracker) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_site(tracker)) as client:
        yield client


def counted(response: httpx.Response) -> str | None:
    value: str | None = response.headers.get("x-view-counted")
    return value


def shown(response: httpx.Response) -> int | None:
    value = response.headers.get("x-view-count")
    return None if value is None else int(value)


# What counts ----------------------------------------------------------------------------------


async def test_counted_view_and_header_equal_the_trackers_count(
    site: httpx.AsyncClient, tracker: ViewTracker, clock: FakeClock
) -> None:
    first = await site.get("/stories/1", headers={**BROWSER, "x-user": "alice"})
    assert (first.status_code, first.text) == (200, "page 1")
    assert (counted(first), shown(first)) == ("1", 1)
    again = await site.get("/stories/1", headers={**BROWSER, "x-user": "alice"})
    assert (counted(again), shown(again)) == ("0; reason=cooldown", 1)
    bob = await site.get("/stories/1", headers={**BROWSER, "x-user": "bob"})
    anonymous = await site.get("/stories/1", headers=BROWSER)
    assert (counted(bob), counted(anonymous)) == ("1", "1")
    assert shown(anonymous) == await tracker.get_view_count("story", 1) == 3
    alice = ViewerIdentity(tracker.settings.secret).user_viewer("alice")
    assert await tracker.redis.hexists(f"viewed:{alice}", "story:1")


async def test_header_includes_the_database_part(
    site: httpx.AsyncClient, tracker: ViewTracker, sqlite_store: Store, clock: FakeClock
) -> None:
    from datetime import UTC, datetime

    await sqlite_store.commit_batch("seed", datetime.now(UTC), {("task", "write-docs"): 40})
    response = await site.get("/tasks/write-docs", headers=BROWSER)
    assert shown(response) == 41 == await tracker.get_view_count("task", "write-docs")
    details = await tracker.get_view_count_details("task", ["write-docs"])
    assert details["write-docs"] is not None and details["write-docs"].database == 40


RULES: dict[str, tuple[Limits, list[tuple[float, str, str]]]] = {
    # rule -> (limits, [(seconds to advance, path, expected X-View-Counted)])
    "cooldown": (
        Limits(view_cooldown_seconds=60, one_view_per_day=False, max_views_per_session=0),
        [(0, "/stories/1", "1"), (59, "/stories/1", "0; reason=cooldown"), (2, "/stories/1", "1")],
    ),
    "viewed_today": (
        Limits(view_cooldown_seconds=0),
        [
            (0, "/stories/1", "1"),
            (3600, "/stories/1", "0; reason=viewed_today"),
            (12 * 3600, "/stories/1", "1"),  # the next calendar day
        ],
    ),
    "session_limit": (
        Limits(view_cooldown_seconds=0, one_view_per_day=False, max_views_per_session=2),
        [
            (0, "/stories/1", "1"),
            (10, "/stories/1", "1"),
            (10, "/stories/1", "0; reason=session_limit"),
            (24 * 3600, "/stories/1", "1"),  # a new session window
        ],
    ),
    "daily_limit": (
        Limits(view_cooldown_seconds=0, max_daily_views_per_user=2),
        [
            (0, "/stories/1", "1"),
            (0, "/fantasies/1", "1"),
            (0, "/stories/2", "0; reason=daily_limit"),
            (12 * 3600, "/stories/2", "1"),
        ],
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
async def test_each_rule_blocks_and_releases(
    rule: str,
    real_redis: aioredis.Redis,
    sqlite_store: Store,
    settings: Settings,
    clock: FakeClock,
) -> None:
    limits, steps = RULES[rule]
    tracker = ViewTracker(real_redis, sqlite_store, settings.replace(limits=limits), clock=clock)
    async with client_for(make_site(tracker)) as client:
        for advance, path, expected in steps:
            clock.advance(advance)
            response = await client.get(path, headers={**BROWSER, "x-user": "carol"})
            assert counted(response) == expected, (rule, advance, path)
            kind, content_id = ("story", path[9:]) if "stories" in path else ("fantasy", "1")
            assert shown(response) == await tracker.get_view_count(kind, content_id)


@pytest.mark.parametrize(
    ("method", "path", "status", "debug"),
    [
        ("HEAD", "/stories/1", 200, None),
        ("POST", "/stories/1", 200, None),
        ("GET", "/missing/1", 404, "0; reason=status"),
        ("GET", "/broken/1", 500, "0; reason=status"),
        ("GET", "/moved/1", 307, "0; reason=status"),
        ("GET", "/stories/1?x=1", 200, "1"),  # the query string does not matter
    ],
)
async def test_only_successful_gets_count(
    site: httpx.AsyncClient,
    tracker: ViewTracker,
    method: str,
    path: str,
    status: int,
    debug: str | None,
) -> None:
    response = await site.request(method, path, headers=BROWSER)
    assert response.status_code == status
    assert counted(response) == debug
    if debug != "1":
        assert shown(response) is None
        assert await tracker.get_view_count("story", 1) == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"sec-purpose": "prefetch"}, "prefetch"),
        ({"sec-purpose": "prefetch;prerender"}, "prefetch"),
        ({"purpose": "prefetch"}, "prefetch"),
        ({"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}, "bot"),
        ({"user-agent": "curl/8.5.0"}, "bot"),
        ({"user-agent": ""}, "bot"),
    ],
)
async def test_prefetch_and_bots_see_the_count_without_counting(
    site: httpx.AsyncClient, tracker: ViewTracker, headers: dict[str, str], reason: str
) -> None:
    await site.get("/stories/1", headers={**BROWSER, "x-user": "dave"})
    response = await site.get("/stories/1", headers={**BROWSER, **headers})
    assert (response.status_code, counted(response), shown(response)) == (
        200,
        f"0; reason={reason}",
        1,
    )
    assert await tracker.get_view_count("story", 1) == 1
    crawler_views = (
        await ViewStats.from_tracker(tracker).views("story", 1, Period.today())
    ).crawler_views
    assert crawler_views == (reason == "bot")  # counted apart, per day


async def test_privacy_signals_are_honoured_only_when_asked(tracker: ViewTracker) -> None:
    async with client_for(make_site(tracker)) as default:
        assert counted(await default.get("/stories/1", headers={**BROWSER, "dnt": "1"})) == "1"
    async with client_for(make_site(tracker, respect_privacy_signals=True)) as polite:
        for signal in ({"dnt": "1"}, {"sec-gpc": "1"}):
            response = await polite.get("/stories/2", headers={**BROWSER, **signal})
            assert (counted(response), shown(response)) == ("0; reason=privacy", 0)
        response = await polite.get("/stories/2", headers={**BROWSER, "dnt": "0"})
        assert (counted(response), shown(response)) == ("1", 1)


async def test_invalid_id_is_not_tracked(site: httpx.AsyncClient, tracker: ViewTracker) -> None:
    response = await site.get("/tasks/" + "x" * 65, headers=BROWSER)
    assert (response.status_code, counted(response), shown(response)) == (
        200,
        "0; reason=invalid_id",
        None,
    )
    assert await tracker.redis.dbsize() == 0


async def test_debug_header_is_off_by_default(tracker: ViewTracker) -> None:
    async with client_for(make_site(tracker, debug_header=None)) as client:
        response = await client.get("/stories/1", headers=BROWSER)
    assert shown(response) == 1
    assert "x-view-counted" not in response.headers


async def test_custom_header_and_statuses(tracker: ViewTracker) -> None:
    options = {"count_header": "Views", "count_statuses": {404}}
    async with client_for(make_site(tracker, **options)) as client:
        missing = await client.get("/missing/3", headers=BROWSER)
        found = await client.get("/stories/3", headers=BROWSER)
    assert (missing.headers["views"], counted(missing)) == ("1", "1")
    assert (counted(found), "views" in found.headers) == ("0; reason=status", False)


async def test_app_headers_kept_and_shared_response_not_mutated(tracker: ViewTracker) -> None:
    routes = {**ROUTES, "/shared/{id:int}": "story"}
    async with client_for(make_site(tracker, routes=routes)) as client:
        for n in (1, 2):
            response = await client.get(f"/shared/{n}", headers=BROWSER)
            assert response.headers["x-app"] == "kept"
            assert response.headers.get_list("x-view-count") == ["1"]
    assert all(not name.startswith(b"x-view") for name, _ in SHARED_RESPONSE.raw_headers)


# Mounting and wiring ----------------------------------------------------------------------------


async def test_mounted_under_a_prefix(tracker: ViewTracker) -> None:
    inner = ViewTrackingMiddleware(
        Starlette(routes=site_routes()), tracker=tracker, routes=ROUTES, debug_header="X-C"
    )
    outer = Starlette(routes=[Mount("/blog", app=inner)])
    async with client_for(outer) as client:
        response = await client.get("/blog/stories/4", headers=BROWSER)
        assert (response.text, response.headers["x-c"], shown(response)) == ("page 4", "1", 1)
        not_a_story = await client.get("/blog/blog/stories/4", headers=BROWSER)
        assert "x-c" not in not_a_story.headers


async def test_root_path_from_a_proxy(tracker: ViewTracker) -> None:
    # uvicorn --root-path /api: the server puts the prefix in root_path (and in path).
    async with client_for(make_site(tracker), root_path="/api") as client:
        response = await client.get("/api/stories/5", headers=BROWSER)
    assert (response.status_code, counted(response), shown(response)) == (200, "1", 1)


async def test_add_middleware_and_bare_asgi_app(tracker: ViewTracker) -> None:
    app = Starlette(routes=site_routes())
    app.add_middleware(ViewTrackingMiddleware, tracker=tracker, routes=ROUTES)
    bare = ViewTrackingMiddleware(plain_app(body=b"bare"), tracker=tracker, routes=ROUTES)
    async with client_for(app) as starlette_client, client_for(bare) as bare_client:
        assert shown(await starlette_client.get("/stories/6", headers=BROWSER)) == 1
        response = await bare_client.get("/stories/6", headers={"user-agent": USER_AGENT + " 2"})
    assert (response.text, shown(response)) == ("bare", 2)


async def test_non_http_scopes_pass_straight_through(tracker: ViewTracker) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        pass

    middleware = ViewTrackingMiddleware(app, tracker=tracker, routes=ROUTES)
    for scope in ({"type": "websocket", "path": "/stories/1"}, {"type": "lifespan"}):
        await middleware(scope, receive, send)
    assert [(s["type"], r, t) for s, r, t in seen] == [
        ("websocket", receive, send),
        ("lifespan", receive, send),
    ]
    assert await tracker.redis.dbsize() == 0


# Streaming and concurrency ----------------------------------------------------------------------


async def test_streaming_response_passes_through_intact(site: httpx.AsyncClient) -> None:
    response = await site.get("/stream/1", headers=BROWSER)
    assert response.text == "".join(f"chunk {n}\n" for n in range(5))
    assert (counted(response), shown(response)) == ("1", 1)


async def test_body_is_forwarded_before_the_app_finishes(tracker: ViewTracker) -> None:
    release = asyncio.Event()
    forwarded: list[Message] = []

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"last"})

    async def send(message: Message) -> None:
        forwarded.append(message)
        if message.get("body") == b"first":
            release.set()  # the first chunk reached the server while the app was mid-stream

    async def receive() -> Message:
        return {"type": "http.request"}

    middleware = ViewTrackingMiddleware(slow_stream, tracker=tracker, routes=ROUTES)
    scope = http_scope("/stories/1", headers=[(b"user-agent", USER_AGENT.encode())])
    await asyncio.wait_for(middleware(scope, receive, send), timeout=10)
    assert [m.get("body") for m in forwarded] == [None, b"first", b"last"]
    assert header(forwarded[0], b"x-view-count") == b"1"


async def test_concurrent_requests_from_one_viewer_count_once(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    # The client the middleware builds itself: a blocking pool, so 150 requests queue for its
    # 100 connections instead of failing. A generous timeout keeps a busy machine from flaking.
    settings = settings.replace(redis_url=REDIS_URL, redis_timeout=10.0)
    tracker = ViewTracker(connect_redis(settings), sqlite_store, settings, clock=clock)
    try:
        await tracker.get_view_count("story", 8)  # cache the database count first
        async with client_for(make_site(tracker)) as client:
            responses = await asyncio.gather(
                *(client.get("/stories/8", headers=BROWSER) for _ in range(150))
            )
    finally:
        await tracker.redis.aclose()
    assert {r.status_code for r in responses} == {200}
    assert sorted(counted(r) or "" for r in responses).count("1") == 1
    assert {shown(r) for r in responses} == {1}
    assert await tracker.get_view_count("story", 8) == 1


async def test_no_address_or_user_agent_in_redis(
    site: httpx.AsyncClient, tracker: ViewTracker, clock: FakeClock
) -> None:
    email_user = "reader@example.com"
    for path in ("/stories/1", "/fantasies/2", "/tasks/write-docs", "/stream/3"):
        await site.get(path, headers=BROWSER)
        await site.get(path, headers={**BROWSER, "x-user": email_user})
        clock.advance(400)
    scanned = await assert_no_personal_data(
        tracker.redis,
        [CLIENT_HOST.encode(), USER_AGENT.encode(), b"ViewmwPrivacyProbe", email_user.encode()],
    )
    assert scanned > 10


# Built from settings ----------------------------------------------------------------------------


async def test_builds_and_owns_its_clients(real_redis: aioredis.Redis, tmp_path: Any) -> None:
    settings = Settings(
        redis_url=REDIS_URL,
        database_url=f"sqlite:///{tmp_path}/owned.sqlite3",
        secret="owned-secret-0123456789",
    )
    middleware = ViewTrackingMiddleware(plain_app(), routes=ROUTES, settings=settings)
    await middleware.startup()  # creates viewmw's tables
    scope = http_scope("/stories/1", headers=[(b"user-agent", USER_AGENT.encode())])
    sent = await drive(middleware, scope)
    assert header(sent[0], b"x-view-count") == b"1"
    assert isinstance(middleware.tracker, ResilientTracker)  # keeps counting through outages
    assert middleware.tracker.tracker.store is not None
    assert middleware.tracker.tracker.store.dialect == "sqlite"
    await middleware.aclose()
    await middleware.aclose()  # idempotent
    assert await real_redis.get("story:views:1") == b"1"


async def test_lifespan_creates_tables_and_closes_owned_clients(
    real_redis: aioredis.Redis, tmp_path: Any
) -> None:
    settings = Settings(
        redis_url=REDIS_URL,
        database_url=f"sqlite:///{tmp_path}/life.sqlite3",
        redis_timeout=5.0,  # generous: a busy machine must not make the count a late one
        database_request_timeout=5.0,
    )
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await plain_app()(scope, receive, send)

    middleware = ViewTrackingMiddleware(app, routes=ROUTES, settings=settings)
    closes: list[str] = []
    original_aclose = middleware.aclose

    async def recording_aclose() -> None:
        closes.append("aclose")
        await original_aclose()

    middleware.aclose = recording_aclose  # type: ignore[method-assign]
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            request = http_scope("/stories/2", headers=[(b"user-agent", USER_AGENT.encode())])
            start = (await drive(middleware, request))[0]
            events.append(f"count={header(start, b'x-view-count')!r}")

    await middleware({"type": "lifespan"}, receive, send)
    assert events == ["lifespan.startup", "count=b'1'", "lifespan.shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert closes == ["aclose"]


async def test_settings_from_env_when_none_given(
    monkeypatch: pytest.MonkeyPatch, real_redis: aioredis.Redis, tmp_path: Any
) -> None:
    monkeypatch.setenv("VIEWMW_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", f"sqlite:///{tmp_path}/env.sqlite3")
    monkeypatch.setenv("VIEWMW_KEY_PREFIX", "envtest:")
    monkeypatch.setenv("VIEWMW_SECRET", "env-secret-0123456789")
    middleware = ViewTrackingMiddleware(plain_app(), routes=ROUTES)
    try:
        await middleware.startup()
        scope = http_scope("/stories/3", headers=[(b"user-agent", USER_AGENT.encode())])
        assert header((await drive(middleware, scope))[0], b"x-view-count") == b"1"
    finally:
        await middleware.aclose()
    assert await real_redis.get("envtest:story:views:3") == b"1"


async def test_embedded_fallback_warns_and_counts(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/embedded.sqlite3")
    with caplog.at_level(logging.WARNING, logger="viewmw"):
        middleware = ViewTrackingMiddleware(plain_app(), routes=ROUTES, settings=settings)
    assert any("not shared between processes" in r.getMessage() for r in caplog.records)
    try:
        await middleware.startup()
        scope = http_scope("/stories/1", headers=[(b"user-agent", USER_AGENT.encode())])
        assert header((await drive(middleware, scope))[0], b"x-view-count") == b"1"
    finally:
        await middleware.aclose()


def test_embedded_fallback_without_fakeredis_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fakeredis", None)
    with pytest.raises(ConfigurationError, match=r"pip install viewmw\[embedded\]"):
        ViewTrackingMiddleware(plain_app(), routes=ROUTES, settings=Settings())


@pytest.mark.parametrize("option", ["count_header", "debug_header"])
@pytest.mark.parametrize("value", ["", "X View", "X-Count:", "Zähler"])
def test_bad_header_names_fail_at_start_up(tracker: ViewTracker, option: str, value: str) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError, match=option):
        ViewTrackingMiddleware(plain_app(), tracker=tracker, routes=ROUTES, **options)


def test_bad_routes_fail_at_start_up(tracker: ViewTracker) -> None:
    with pytest.raises(ConfigurationError, match="unknown path converter"):
        ViewTrackingMiddleware(plain_app(), tracker=tracker, routes={"/s/{id:nope}": "story"})


async def test_viewer_callable_decides_the_user(tracker: ViewTracker) -> None:
    async def by_query(scope: Scope) -> object:
        return scope["query_string"].decode() or None

    middleware = ViewTrackingMiddleware(
        plain_app(), tracker=tracker, routes=ROUTES, viewer=by_query
    )
    scope = http_scope("/stories/1", headers=[(b"user-agent", USER_AGENT.encode())])
    scope["query_string"] = b"1001"
    for _ in range(2):
        await drive(middleware, scope)
    assert (await tracker.redis.hget("viewed:user:1001", "story:1") or b"").startswith(b"1:")


class CountingConnection(Connection):
    """Counts writes to Redis: one per command, or one per pipeline of commands."""

    writes = 0

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(*args, **kwargs)


async def test_one_redis_round_trip_per_tracked_request(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    client = aioredis.Redis.from_url(REDIS_URL, connection_class=CountingConnection)
    try:
        tracker = ViewTracker(client, sqlite_store, settings, clock=clock)
        middleware = ViewTrackingMiddleware(plain_app(), tracker=tracker, routes=ROUTES)
        agent = [(b"user-agent", USER_AGENT.encode())]
        await drive(middleware, http_scope("/stories/1", headers=agent))  # connects, caches
        writes = []
        for n in range(2, 6):  # other viewers, counted; then a repeat, blocked
            other = [(b"user-agent", USER_AGENT.encode() + str(n).encode())]
            before = CountingConnection.writes
            await drive(middleware, http_scope("/stories/1", headers=other if n < 5 else agent))
            writes.append(CountingConnection.writes - before)
        assert writes == [1, 1, 1, 1]
        assert await tracker.get_view_count("story", 1) == 4
    finally:
        await client.aclose()
