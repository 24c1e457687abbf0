"""Counts inside handlers: track(request), request.state.viewmw and view_counts, in a Starlette
app on the real Redis (and fakeredis where it adds a backend)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.asgi_support import CLIENT_HOST, USER_AGENT, drive, http_scope
from tests.support import FakeClock
from tests.test_middleware import HeaderUser
from viewmw import (
    CircuitBreaker,
    InvalidKeyError,
    MiddlewareMissingError,
    Outbox,
    RequestView,
    ResilientTracker,
    Settings,
    Store,
    ViewTracker,
    ViewTrackingMiddleware,
    track,
    view_counts,
)
from viewmw.errorlog import ErrorLog
from viewmw.metrics.recording import Recorder
from viewmw.routes import RouteMatch

ROUTES: dict[str, Any] = {
    "/stories/{id:int}": "story",
    "/quiet/{id:int}": "story",
    "/tasks/{slug}": ("task", "slug"),
}
BROWSER = {"user-agent": USER_AGENT}


def described(view: RequestView) -> dict[str, Any]:
    return {
        "type": view.content_type,
        "id": view.content_id,
        "tracked": view.tracked,
        "decided": view.decided,
        "counted": view.counted,
        "queued": view.queued,
        "count": view.count,
        "reason": view.reason,
    }


class Spy:
    """A tracker that counts the calls the middleware and the helpers make, then delegates."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.offered: list[tuple[str, str, str]] = []
        self.reads: list[tuple[str, list[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)

    async def track_valid_view(self, content_type: str, content_id: str, viewer: str) -> Any:
        self.offered.append((content_type, content_id, viewer))
        return await self.tracker.track_valid_view(content_type, content_id, viewer)

    async def get_view_count_details(self, content_type: str, ids: Sequence[str]) -> Any:
        self.reads.append((content_type, list(ids)))
        return await self.tracker.get_view_count_details(content_type, ids)


# The test app -----------------------------------------------------------------------------------

seen_after_response: list[dict[str, Any]] = []


async def detail(request: Request) -> Response:
    """Decides its view first, then renders the count that includes it."""
    query = request.query_params
    # Only the requests of the middleware's routes have one (not a POST, say).
    state = getattr(request.state, "viewmw", None)
    before = None if state is None else described(state)
    if "gather" in query:
        views = await asyncio.gather(*(track(request) for _ in range(int(query["gather"]))))
        assert all(v is views[0] for v in views)
    view = await track(request)
    if "twice" in query:
        assert await track(request) is view
    status = int(query.get("status", "200"))
    return JSONResponse({"before": before, "view": described(view)}, status_code=status)


async def quiet(request: Request) -> Response:
    """Never calls track: request.state.viewmw is read after the response started."""

    def remember() -> None:
        seen_after_response.append(described(request.state.viewmw))

    return PlainTextResponse(
        f"undecided: {not request.state.viewmw.decided}", background=BackgroundTask(remember)
    )


async def listing(request: Request) -> Response:
    ids = request.query_params.getlist("id")
    return JSONResponse(await view_counts(request, "story", ids))


async def about(request: Request) -> Response:
    return JSONResponse(described(await track(request)))


def make_app(tracker: Any, **options: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/stories/{id:int}", detail, methods=["GET", "POST"]),
            Route("/quiet/{id:int}", quiet),
            Route("/tasks/{slug}", detail),
            Route("/stories", listing),
            Route("/about", about),
        ],
        middleware=[
            Middleware(
                ViewTrackingMiddleware,
                tracker=tracker,
                routes=ROUTES,
                debug_header="X-View-Counted",
                **options,
            ),
            Middleware(AuthenticationMiddleware, backend=HeaderUser()),
        ],
    )


@contextlib.asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app, client=(CLIENT_HOST, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def spy(tracker: ViewTracker) -> Spy:
    return Spy(tracker)


@pytest.fixture
async def site(spy: Spy) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(spy)) as client:
        yield client


def header_count(response: httpx.Response) -> int | None:
    value = response.headers.get("x-view-count")
    return None if value is None else int(value)


# track(request) ---------------------------------------------------------------------------------


async def test_the_page_shows_the_count_that_includes_its_own_view(
    site: httpx.AsyncClient, spy: Spy, tracker: ViewTracker, clock: FakeClock
) -> None:
    pages = []
    for user in ("ann", "ben", "ann", "cat"):
        response = await site.get("/stories/7", headers={**BROWSER, "x-user": user})
        assert response.status_code == 200
        pages.append(response)
    shown = [(p.json()["view"]["count"], p.json()["view"]["reason"]) for p in pages]
    assert shown == [(1, None), (2, None), (2, "cooldown"), (3, None)]
    # The page and the header say the same number; the view was offered once per request.
    assert [p.json()["view"]["count"] for p in pages] == [header_count(p) for p in pages]
    assert [p.headers["x-view-counted"] for p in pages] == ["1", "1", "0; reason=cooldown", "1"]
    assert len(spy.offered) == 4
    assert await tracker.get_view_count("story", 7) == 3
    first = pages[0].json()
    assert first["before"] == {
        "type": "story",
        "id": "7",
        "tracked": True,
        "decided": False,
        "counted": False,
        "queued": False,
        "count": None,
        "reason": None,
    }
    assert first["view"] == {**first["before"], "decided": True, "counted": True, "count": 1}


@pytest.mark.parametrize("calls", ["twice=1", "gather=25"])
async def test_a_handler_calling_track_more_than_once_offers_the_view_once(
    site: httpx.AsyncClient, spy: Spy, tracker: ViewTracker, calls: str
) -> None:
    response = await site.get(f"/stories/3?{calls}", headers=BROWSER)
    assert response.json()["view"]["count"] == header_count(response) == 1
    assert len(spy.offered) == 1
    assert await tracker.redis.get("story:views:3") == b"1"


async def test_concurrent_requests_each_see_their_own_view_counted_once(
    site: httpx.AsyncClient, spy: Spy, tracker: ViewTracker
) -> None:
    # The database count is cached first: a cold one is read after the batch, for all its views.
    assert await tracker.get_view_count("story", 5) == 0
    users = [f"reader{n}" for n in range(40)]
    pages = await asyncio.gather(
        *(site.get("/stories/5", headers={**BROWSER, "x-user": user}) for user in users)
    )
    counts = sorted(page.json()["view"]["count"] for page in pages)
    # Every view counted once: the forty pages showed forty different totals, 1 to 40.
    assert counts == list(range(1, 41))
    assert all(page.json()["view"]["count"] == header_count(page) for page in pages)
    assert len(spy.offered) == 40
    assert await tracker.get_view_count("story", 5) == 40


async def test_a_view_tracked_before_an_error_status_was_offered_and_says_so(
    site: httpx.AsyncClient, tracker: ViewTracker
) -> None:
    response = await site.get("/stories/9?status=404", headers=BROWSER)
    assert response.status_code == 404
    assert (header_count(response), response.headers["x-view-counted"]) == (1, "1")
    failed = await site.get("/stories/9?status=500", headers={**BROWSER, "x-user": "zed"})
    assert (header_count(failed), failed.headers["x-view-counted"]) == (2, "1")
    assert await tracker.get_view_count("story", 9) == 2


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"user-agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"}, "bot"),
        ({**BROWSER, "sec-purpose": "prefetch"}, "prefetch"),
        ({**BROWSER, "dnt": "1"}, "privacy"),
    ],
)
async def test_signals_that_are_not_counted_give_their_reason_and_the_count(
    spy: Spy, tracker: ViewTracker, headers: dict[str, str], reason: str
) -> None:
    await tracker.track_view("story", 4, "user:1")
    async with client_for(make_app(spy, respect_privacy_signals=True)) as site:
        response = await site.get("/stories/4", headers=headers)
    view = response.json()["view"]
    assert (view["counted"], view["reason"], view["count"]) == (False, reason, 1)
    assert header_count(response) == 1
    assert response.headers["x-view-counted"] == f"0; reason={reason}"
    assert spy.offered == []


async def test_an_id_that_cannot_be_a_key_is_not_offered(site: httpx.AsyncClient, spy: Spy) -> None:
    response = await site.get("/tasks/" + "x" * 65, headers=BROWSER)
    view = response.json()["view"]
    assert (view["tracked"], view["reason"], view["count"]) == (True, "invalid_id", None)
    assert "x-view-count" not in response.headers and spy.offered == []


async def test_requests_the_middleware_does_not_track_say_so(
    site: httpx.AsyncClient, spy: Spy
) -> None:
    about = await site.get("/about", headers=BROWSER)
    post = await site.post("/stories/1", headers=BROWSER)
    expected = {"type": None, "id": None, "tracked": False, "decided": True, "counted": False}
    for response in (about, post):
        assert response.status_code == 200
        view = response.json() if response is about else response.json()["view"]
        assert {k: view[k] for k in expected} == expected
        assert (view["reason"], view["count"]) == ("not_tracked", None)
        assert "x-view-count" not in response.headers
    head = await site.head("/stories/1", headers=BROWSER)
    assert head.status_code == 200 and "x-view-count" not in head.headers
    assert spy.offered == []


async def test_outside_the_middleware_the_helpers_raise_a_clear_error() -> None:
    request = Request(http_scope("/stories/1"))
    with pytest.raises(MiddlewareMissingError, match="no ViewTrackingMiddleware"):
        await track(request)
    with pytest.raises(MiddlewareMissingError):
        await view_counts(request, "story", ["1"])


async def test_in_the_deferred_mode_track_waits_for_its_own_view(
    spy: Spy, tracker: ViewTracker
) -> None:
    async with client_for(make_app(spy, deferred=True)) as site:
        await site.get("/quiet/2", headers={**BROWSER, "x-user": "ann"})  # now known here
        deferred = await site.get("/quiet/2", headers={**BROWSER, "x-user": "ben"})
        tracked = await site.get("/stories/2", headers={**BROWSER, "x-user": "cat"})
        await tracker.drain()
    assert deferred.headers["x-view-counted"] == "0; reason=deferred"
    view = tracked.json()["view"]
    assert (view["counted"], view["count"], header_count(tracked)) == (True, 3, 3)
    assert await tracker.get_view_count("story", 2) == 3


async def test_during_an_outage_the_tracked_view_is_queued_and_shown(
    tracker: ViewTracker, sqlite_store: Store
) -> None:
    breaker = CircuitBreaker(clock=FakeClock(now=0.0))
    resilient = ResilientTracker(tracker, Outbox(sqlite_store.engine), breaker=breaker)
    breaker.trip()  # Redis is failing: views go to the outbox
    try:
        async with client_for(make_app(resilient)) as site:
            pages = [await site.get("/stories/6", headers={**BROWSER, "x-user": u}) for u in "ab"]
    finally:
        await resilient.aclose()
    views = [page.json()["view"] for page in pages]
    assert [(v["counted"], v["queued"], v["reason"], v["count"]) for v in views] == [
        (False, True, None, 1),
        (False, True, None, 2),
    ]
    assert [page.headers["x-view-counted"] for page in pages] == ["1; queued"] * 2
    assert [header_count(page) for page in pages] == [1, 2]
    assert await Outbox(sqlite_store.engine).counts("story", ["6"]) == {"6": 2}


class LateTracker(Spy):
    """Records the view in Redis, then holds the reply until released (a late reply)."""

    def __init__(self, tracker: Any) -> None:
        super().__init__(tracker)
        self.recorded = asyncio.Event()
        self.release = asyncio.Event()

    async def track_valid_view(self, content_type: str, content_id: str, viewer: str) -> Any:
        result = await super().track_valid_view(content_type, content_id, viewer)
        self.recorded.set()
        await self.release.wait()
        return result


async def test_a_cancelled_track_is_never_offered_again(tracker: ViewTracker) -> None:
    late = LateTracker(tracker)
    outcomes: list[dict[str, Any]] = []

    async def impatient(request: Request) -> Response:
        attempt = asyncio.create_task(track(request))
        await late.recorded.wait()
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attempt
        outcomes.append(described(await track(request)))  # a second call shares the outcome
        return PlainTextResponse("rendered without a count")

    app = Starlette(
        routes=[Route("/stories/{id:int}", impatient)],
        middleware=[
            Middleware(
                ViewTrackingMiddleware, tracker=late, routes=ROUTES, debug_header="X-View-Counted"
            )
        ],
    )
    async with client_for(app) as site:
        response = await site.get("/stories/8", headers=BROWSER)
    late.release.set()
    assert response.status_code == 200 and "x-view-count" not in response.headers
    assert response.headers["x-view-counted"] == "0; reason=unavailable"
    assert (outcomes[0]["decided"], outcomes[0]["reason"]) == (True, "unavailable")
    # Offered once; the script decided it, and nothing offered it again.
    assert len(late.offered) == 1
    assert await tracker.redis.get("story:views:8") == b"1"


async def test_a_broken_scope_leaves_the_page_rendering(
    tracker: ViewTracker, caplog: pytest.LogCaptureFixture
) -> None:
    async def page(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope)
        scope["headers"] = None  # an inner layer mangled the scope
        view = await track(request)
        await PlainTextResponse(f"{view.reason}")(scope, receive, send)

    app = ViewTrackingMiddleware(page, tracker=tracker, routes=ROUTES)
    with caplog.at_level(logging.ERROR, logger="viewmw"):
        sent = await drive(app, http_scope("/stories/1", headers=[(b"user-agent", b"x")]))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"error"
    assert [getattr(r, "viewmw_error", None) for r in caplog.records] == ["unexpected"]


# request.state.viewmw without track() ----------------------------------------------------------


async def test_request_state_carries_the_outcome_once_the_response_started(
    site: httpx.AsyncClient, spy: Spy
) -> None:
    seen_after_response.clear()
    first = await site.get("/quiet/11", headers={**BROWSER, "x-user": "ann"})
    again = await site.get("/quiet/11", headers={**BROWSER, "x-user": "ann"})
    assert first.text == again.text == "undecided: True"
    assert seen_after_response == [
        {
            "type": "story",
            "id": "11",
            "tracked": True,
            "decided": True,
            "counted": True,
            "queued": False,
            "count": header_count(first),
            "reason": None,
        },
        {
            "type": "story",
            "id": "11",
            "tracked": True,
            "decided": True,
            "counted": False,
            "queued": False,
            "count": header_count(again),
            "reason": "cooldown",
        },
    ]
    assert header_count(first) == header_count(again) == 1 and len(spy.offered) == 2


async def test_a_status_that_does_not_count_is_the_states_reason(spy: Spy) -> None:
    seen: list[RequestView] = []

    async def gone(scope: Any, receive: Any, send: Any) -> None:
        seen.append(Request(scope).state.viewmw)
        await PlainTextResponse("gone", status_code=404)(scope, receive, send)

    app = ViewTrackingMiddleware(gone, tracker=spy, routes=ROUTES)
    await drive(app, http_scope("/stories/1", headers=[(b"user-agent", b"x")]))
    assert (seen[0].decided, seen[0].reason, seen[0].count) == (True, "status", None)
    assert spy.offered == [] and repr(seen[0]) == (
        "<RequestView story:1 count=None counted=False queued=False reason=status>"
    )


# view_counts(request, ...) ---------------------------------------------------------------------


async def test_a_list_page_reads_every_count_in_one_call(
    site: httpx.AsyncClient, spy: Spy, tracker: ViewTracker, sqlite_store: Store
) -> None:
    from datetime import UTC, datetime

    await sqlite_store.commit_batch("seed", datetime.now(UTC), {("story", "2"): 40})
    for user in ("ann", "ben"):
        await site.get("/stories/1", headers={**BROWSER, "x-user": user})
    spy.reads.clear()
    response = await site.get("/stories?id=1&id=2&id=3&id=1&id=not+a+key")
    assert response.json() == {"1": 2, "2": 40, "3": 0}
    assert list(response.json()) == ["1", "2", "3"]
    # One read for the whole page; the id that can never be tracked is left out before it.
    assert spy.reads == [("story", ["1", "2", "3", "1"])]
    spy.reads.clear()
    assert (await site.get("/stories")).json() == {}
    assert spy.reads == []


async def test_counts_that_cannot_be_read_are_left_out_and_logged(
    tracker: ViewTracker, caplog: pytest.LogCaptureFixture
) -> None:
    class Down(Spy):
        async def get_view_count_details(self, content_type: str, ids: Sequence[str]) -> Any:
            raise RedisConnectionError("Connection refused")

    async with client_for(make_app(Down(tracker))) as site:
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            response = await site.get("/stories?id=1&id=2")
    assert response.status_code == 200 and response.json() == {}
    assert [getattr(r, "viewmw_error", None) for r in caplog.records] == ["redis"]


async def test_view_counts_refuses_a_bad_content_type_or_one_id(spy: Spy) -> None:
    middleware = ViewTrackingMiddleware(PlainTextResponse("ok"), tracker=spy, routes=ROUTES)
    request = Request({**http_scope("/about"), "viewmw": RequestView.untracked(middleware)})
    with pytest.raises(InvalidKeyError):
        await view_counts(request, "Not A Type", ["1"])
    with pytest.raises(TypeError, match="not one id"):
        await view_counts(request, "story", "12")
    assert spy.reads == []


async def test_view_counts_with_the_resilient_tracker_on_fakeredis(
    fake_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> None:
    inner = ViewTracker(fake_redis, sqlite_store, settings, clock=clock)
    resilient = ResilientTracker(inner, Outbox(sqlite_store.engine))
    try:
        async with client_for(make_app(resilient)) as site:
            page = await site.get("/stories/12", headers=BROWSER)
            listing = await site.get("/stories?id=12&id=13")
    finally:
        await resilient.aclose()
    assert page.json()["view"]["count"] == header_count(page) == 1
    assert listing.json() == {"12": 1, "13": 0}


def test_a_view_outcome_reads_like_the_debug_header() -> None:
    middleware: Any = object()
    cases = {
        (5, b"1"): (True, False, None, 5),
        (5, b"1; queued"): (False, True, None, 5),
        (5, b"0; reason=daily_limit"): (False, False, "daily_limit", 5),
        (None, b"0; reason=unavailable"): (False, False, "unavailable", None),
    }
    for values, expected in cases.items():
        view = RequestView(middleware, None, values)
        assert (view.counted, view.queued, view.reason, view.count) == expected
    undecided = RequestView(middleware, RouteMatch("story", "1", "/stories/{id:int}"))
    assert repr(undecided) == "<RequestView story:1 undecided>"
    assert (undecided.decided, undecided.count, undecided.reason) == (False, None, None)


async def test_track_racing_the_response_start_offers_the_view_once(spy: Spy) -> None:
    async def racing(scope: Any, receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": []}
        copied = dict(scope)  # an inner layer that copies the scope shares the same view
        view, _ = await asyncio.gather(track(Request(copied)), send(start))
        await send({"type": "http.response.body", "body": b"%d" % (view.count or 0)})

    app = ViewTrackingMiddleware(racing, tracker=spy, routes=ROUTES, debug_header="X-View-Counted")
    sent = await drive(
        app, http_scope("/stories/1", headers=[(b"user-agent", USER_AGENT.encode())])
    )
    headers = dict(sent[0]["headers"])
    assert (headers[b"x-view-count"], headers[b"x-view-counted"], sent[1]["body"]) == (
        b"1",
        b"1",
        b"1",
    )
    assert len(spy.offered) == 1


# Any interleaving decides once ------------------------------------------------------------------


class HeldDecision:
    """Stands in for the middleware: its decision waits until released, and is counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.errors = ErrorLog()
        self.metrics = Recorder()

    async def _outcome(self, scope: Any, match: Any, *, wait: bool = False) -> tuple[int, bytes]:
        self.calls += 1
        await self.release.wait()
        return 7, b"1"


callers = st.lists(
    st.tuples(st.sampled_from(["track", "response start", "status not counted"]), st.booleans()),
    min_size=1,
    max_size=8,
)


@hypothesis_settings(max_examples=150, deadline=None)
@given(plan=callers)
async def test_any_mix_of_callers_and_cancellations_decides_the_view_once(
    plan: list[tuple[str, bool]],
) -> None:
    middleware: Any = HeldDecision()
    view = RequestView(middleware, RouteMatch("story", "1", "/stories/{id:int}"))
    tasks = []
    for kind, _ in plan:
        counts, wait = kind != "status not counted", kind == "track"
        tasks.append(asyncio.create_task(view.decide({}, counts=counts, wait=wait)))
        await asyncio.sleep(0)  # each caller runs up to its first wait before the next starts
    for task, (_, cancel) in zip(tasks, plan, strict=True):
        if cancel:
            task.cancel()
    await asyncio.sleep(0)
    middleware.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    first_kind, first_cancelled = plan[0]
    if first_kind == "status not counted":
        expected, calls = (None, b"0; reason=status"), 0
    elif first_cancelled:  # the view may have been offered: unknown, never offered again
        expected, calls = (None, b"0; reason=unavailable"), 1
    else:
        expected, calls = (7, b"1"), 1
    assert middleware.calls == calls
    assert view.decided and (view.count, view._values) == (expected[0], expected)
    for result, (_, cancel) in zip(results, plan, strict=True):
        assert result == expected or (cancel and isinstance(result, asyncio.CancelledError))
