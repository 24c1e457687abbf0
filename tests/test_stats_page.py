"""The stats page: what it shows, from a seeded source and a real ledger; failing panels; HTTP.

Rendering in a real browser is in test_stats_page_browser.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount

from tests.asgi_support import drive, free_port, header, http_scope
from tests.stats_page_support import (
    PERIODS,
    Element,
    SeededStats,
    chromium,
    commit_batches,
    parse,
    top_list,
)
from tests.support import GENEROUS_DEADLINES
from viewmw import BlockReason, ConfigurationError, Settings, Store, ViewTracker
from viewmw.health import Check, HealthReport
from viewmw.outage.failover import ResilientTracker
from viewmw.stats_page import StatsPage
from viewmw.stats_render import (
    BreakerView,
    PageData,
    SyncBatch,
    TopCell,
    Unavailable,
    render_page,
    sync_chart,
)

SEEDED = SeededStats(
    top={
        ("story", "today"): [("17", 9), ("4", 4)],
        ("story", "7d"): [("4", 31), ("17", 12), ("99", 1)],
        ("fantasy", "7d"): [("abc-1", 2)],
    },
    blocked={
        "today": {"cooldown": 3, "viewed_today": 11},
        "7d": {"cooldown": 8, "viewed_today": 40, "session_limit": 2, "daily_limit": 1},
    },
)
# Three syncs through the ledger: 3, then 12, then 5 views.
BATCHES = [
    {("article", "1"): 3},
    {("article", "1"): 5, ("article", "2"): 7},
    {("article", "3"): 5},
]


def page_for(
    stats: object,
    redis: aioredis.Redis,
    store: Store,
    settings: Settings,
    **options: object,
) -> StatsPage[str]:
    options.setdefault("periods", PERIODS)
    return StatsPage(stats, ViewTracker(redis, store, settings), **options)  # type: ignore[arg-type]


async def get(app: object, path: str = "/", method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://site") as client:
        return await client.request(method, path)


def blocked_table(page: Element) -> dict[str, list[str]]:
    table = page.find("section", id="blocked")
    rows = {row.attrs["data-reason"] or "": row for row in table.find_all("tr") if row.attrs}
    return {
        reason: [cell.text() for cell in row.children if isinstance(cell, Element)][1:]
        for reason, row in rows.items()
    }


async def test_the_page_shows_the_seeded_top_contents_blocked_views_and_the_ledger(
    real_redis: aioredis.Redis, store: Store, settings: Settings
) -> None:
    await commit_batches(store, BATCHES)
    response = await get(page_for(SEEDED, real_redis, store, settings))

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = parse(response.text)
    # The conftest store maps story and fantasy to tables: those are the default types.
    assert [s.attrs["data-type"] for s in page.find_all("section", class_="type")] == [
        "fantasy",
        "story",
    ]
    assert top_list(page, "story", "Today") == [("17", 9), ("4", 4)]
    assert top_list(page, "story", "Last 7 days") == [("4", 31), ("17", 12), ("99", 1)]
    assert top_list(page, "fantasy", "Today") == "No views."
    assert top_list(page, "fantasy", "Last 7 days") == [("abc-1", 2)]
    assert blocked_table(page) == {
        "cooldown": ["3", "8"],
        "viewed_today": ["11", "40"],
        "session_limit": ["0", "2"],
        "daily_limit": ["0", "1"],
        "total": ["14", "51"],
    }
    # The chart: one bar per committed batch, oldest first, each naming its batch.
    chart = page.find("svg", id="sync-chart")
    bars = chart.find_all("g", class_="bar")
    assert [bar.attrs["data-views"] for bar in bars] == ["3", "12", "5"]
    assert [bar.find("title").text().split(":")[0] for bar in bars] == [
        "batch b1",
        "batch b2",
        "batch b3",
    ]
    assert "12 views of 2 contents" in bars[1].find("title").text()
    # And the table of batches, newest first, with the ledger's counts.
    rows = page.find("section", id="syncs").rows()
    assert [(row[0], row[3], row[4]) for row in rows] == [
        ("b3", "1", "5"),
        ("b2", "2", "12"),
        ("b1", "1", "3"),
    ]
    assert page.find("p", id="health-verdict").text() == "Healthy"
    assert page.find_all(id="breaker") == []  # a plain tracker has no breaker


async def test_the_page_asks_the_source_for_each_type_and_period_with_its_limit(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    stats = SeededStats(SEEDED.top_lists, SEEDED.blocked_counts)
    page = page_for(stats, real_redis, sqlite_store, settings, content_types=["story"], top_limit=2)
    shown = parse((await get(page)).text)

    assert sorted(stats.calls) == [
        ("blocked", "7d"),
        ("blocked", "today"),
        ("top", "story", "7d", "2"),
        ("top", "story", "today", "2"),
    ]
    assert top_list(shown, "story", "Last 7 days") == [("4", 31), ("17", 12)]


async def test_an_empty_ledger_and_no_content_types_say_so(
    real_redis: aioredis.Redis, sqlite_store: Store
) -> None:
    store = Store(sqlite_store.engine)  # no mapped tables: no default content types
    page = parse((await get(page_for(SEEDED, real_redis, store, Settings(secret="s" * 16)))).text)

    assert page.find("section", id="syncs").find("p").text() == "No sync has committed yet."
    assert "No content types to show" in page.find("section", id="top").text()
    assert page.find_all("svg") == []


class FailingStats:
    """top fails for one type and returns garbage for another; blocked hangs for one period."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def top(self, content_type: str, period: str, limit: int = 10) -> list[tuple[str, int]]:
        if content_type == "story" and period == "today":
            raise RuntimeError("the analytics query failed")
        if content_type == "fantasy" and period == "today":
            return [("1", "lots")]  # type: ignore[list-item]
        return [("7", 70)]

    async def blocked(self, period: str) -> dict[str, int]:
        if period == "7d":
            await self.never.wait()
        return {"cooldown": 1}


async def test_a_failing_panel_shows_unavailable_and_the_rest_of_the_page_is_served(
    real_redis: aioredis.Redis,
    store: Store,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await commit_batches(store, BATCHES[:1])
    page = page_for(FailingStats(), real_redis, store, settings, panel_timeout=0.5)
    with caplog.at_level(logging.ERROR, logger="viewmw"):
        response = await get(page)

    assert response.status_code == 200
    shown = parse(response.text)
    assert top_list(shown, "story", "Today") == "unavailable (RuntimeError)"
    assert top_list(shown, "fantasy", "Today") == "unavailable (ValueError)"
    assert top_list(shown, "story", "Last 7 days") == [("7", 70)]
    assert blocked_table(shown)["cooldown"] == ["1", "unavailable"]
    assert blocked_table(shown)["total"] == ["1", "unavailable"]
    assert len(shown.find("svg", id="sync-chart").find_all("g", class_="bar")) == 1
    assert "the analytics query failed" not in response.text  # details go to the log only
    assert any("the analytics query failed" in r.getMessage() for r in caplog.records)


async def test_redis_and_the_database_down_still_serve_a_page_that_says_so(
    settings: Settings,
) -> None:
    down_redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    # A database file in a directory that does not exist: every query fails.
    down_store = Store.from_url("sqlite+aiosqlite:////nonexistent-viewmw-dir/stats.sqlite3")
    try:
        response = await get(
            page_for(SEEDED, down_redis, down_store, settings, content_types=["story"])
        )
    finally:
        await down_redis.aclose()
        await down_store.close()

    assert response.status_code == 200
    page = parse(response.text)
    assert page.find("p", id="health-verdict").text() == "Unhealthy"
    failing = {row.attrs["data-check"] for row in page.find_all("tr", class_="failing")}
    assert {"redis", "database", "last_sync"} <= failing
    assert page.find("section", id="syncs").text().startswith("Sync history unavailable (")
    assert top_list(page, "story", "Today") == [("17", 9), ("4", 4)]


async def test_the_breaker_state_of_a_resilient_tracker_is_shown(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    # Generous deadlines: this test is about the breaker's panel, not about deadlines.
    settings = settings.replace(**GENEROUS_DEADLINES)
    resilient = ResilientTracker(ViewTracker(real_redis, sqlite_store, settings))
    page = StatsPage(SEEDED, resilient, periods=PERIODS)
    try:
        assert "closed" in parse((await get(page)).text).find("p", id="breaker").text()
        for _ in range(resilient.breaker.failure_threshold):
            resilient.breaker.failure()
        breaker = parse((await get(page)).text).find("p", id="breaker")
    finally:
        await resilient.aclose()  # and what it started while the breaker was open
    assert breaker.find("strong").text() == "open"
    assert "opened 1 times" in breaker.text()
    assert breaker.attrs["class"] == "breaker failing"


async def test_many_concurrent_requests_each_get_the_whole_page(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings
) -> None:
    await commit_batches(pg_store, BATCHES)
    page = page_for(SEEDED, real_redis, pg_store, settings)
    responses = await asyncio.gather(*(get(page) for _ in range(20)))

    assert {response.status_code for response in responses} == {200}
    for response in responses:
        shown = parse(response.text)
        assert top_list(shown, "story", "Today") == [("17", 9), ("4", 4)]
        assert len(shown.find_all("g", class_="bar")) == 3


class CountingStats(SeededStats):
    """Records how many of its calls are in flight at once."""

    def __init__(self) -> None:
        super().__init__(SEEDED.top_lists, SEEDED.blocked_counts)
        self.in_flight = self.most_in_flight = 0

    async def top(self, content_type: str, period: str, limit: int = 10) -> list[tuple[str, int]]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let every other panel start, if it may
            await asyncio.sleep(0)
            return await super().top(content_type, period, limit)
        finally:
            self.in_flight -= 1


async def test_panels_read_at_once_stay_within_the_limit_across_concurrent_requests(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    stats = CountingStats()
    types = [f"type_{number}" for number in range(12)]
    page = page_for(
        stats, real_redis, sqlite_store, settings, content_types=types, concurrent_reads=3
    )
    responses = await asyncio.gather(*(get(page) for _ in range(5)))

    assert {response.status_code for response in responses} == {200}
    # Never passed. (Whether it is reached depends on how the panels' reads interleave: other
    # panels share the same turns.)
    assert 1 <= stats.most_in_flight <= 3
    assert len([call for call in stats.calls if call[0] == "top"]) == 5 * 12 * 2
    for response in responses:
        assert parse(response.text).find_all(class_="unavailable") == []


def _batches(*views: int) -> list[SyncBatch]:
    """Ledger rows, newest first, with these views (oldest first)."""
    start = datetime(2026, 11, 30, tzinfo=UTC)
    return [
        SyncBatch(f"b{number}", start, start + timedelta(hours=number, seconds=2), 1, count)
        for number, count in reversed(list(enumerate(views, 1)))
    ]


@pytest.mark.parametrize(
    ("views", "heights", "top_label"),
    [
        ((100, 50, 0), [140.0, 70.0, 0.0], "100"),
        ((1, 100_000), [1.0, 140.0], "100,000"),  # a small batch stays visible
        ((0, 0), [0.0, 0.0], "0"),
        ((7,), [140.0], "7"),
    ],
)
def test_the_chart_scales_bars_to_the_busiest_sync_oldest_first(
    views: tuple[int, ...], heights: list[float], top_label: str
) -> None:
    chart = parse(sync_chart(_batches(*views))).find("svg")
    rects = [float(rect.attrs["height"] or "") for rect in chart.find_all("rect")]
    assert rects == heights
    assert [bar.attrs["data-views"] for bar in chart.find_all("g")] == [str(v) for v in views]
    assert chart.find_all("text", class_="axis")[0].text() == top_label


# Escaping ---------------------------------------------------------------------------------------

# Any printable text, markup and quotes included: none of it may change the page's structure.
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("<>&\"'`=/"),
    min_size=1,
    max_size=30,
)


def _data(text: list[str]) -> PageData:
    """A page whose every outside value is one of ``text``."""
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    return PageData(
        title=text[0],
        generated_at=now,
        health=HealthReport(False, (Check("redis", False, text[1]), Check(text[2], True, "ok"))),
        breaker=BreakerView(text[3], 2),
        syncs=[SyncBatch(text[4], now - timedelta(seconds=3), now, 2, 9)],
        periods=[text[5], "other"],
        top=[
            TopCell(text[6], text[5], [(text[7], 4)]),
            TopCell(text[6], "other", Unavailable(text[8])),
        ],
        blocked={text[5]: {text[9]: 3}, "other": Unavailable("x")},
    )


def _shape(html: str) -> list[tuple[str, list[str]]]:
    return [(element.tag, sorted(element.attrs)) for element in parse(html).walk()]


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_TEXT, min_size=10, max_size=10, unique=True).filter(
        # Another period's name, or a reason the page lists anyway, would change the rows.
        lambda t: "other" not in t and not set(t) & {str(reason) for reason in BlockReason}
    )
)
def test_outside_values_are_escaped_and_never_change_the_page_structure(text: list[str]) -> None:
    plain = [f"value{number}" for number in range(10)]
    hostile_page, plain_page = render_page(_data(text)), render_page(_data(plain))

    assert _shape(hostile_page) == _shape(plain_page)
    shown = parse(hostile_page)
    assert shown.find("section", data_type=text[6]).find("td", class_="id").text() == " ".join(
        text[7].split()
    )
    assert text[9] in [row.attrs.get("data-reason") for row in shown.find_all("tr")]
    assert not any(tag == "script" for tag, _ in _shape(hostile_page))


async def test_a_hostile_content_id_from_the_source_arrives_as_text(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    stats = SeededStats({("story", "today"): [(hostile, 1)]}, {"today": {hostile: 2}})
    response = await get(page_for(stats, real_redis, sqlite_store, settings))

    assert "<script" not in response.text and "<img" not in response.text
    assert top_list(parse(response.text), "story", "Today") == [(hostile, 1)]


# HTTP -------------------------------------------------------------------------------------------


async def test_headers_methods_and_paths(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    page = page_for(SEEDED, real_redis, sqlite_store, settings)
    response = await get(page)
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script" not in policy and "unsafe" not in policy
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"

    head = await get(page, method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 1000
    post = await get(page, method="POST")
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
    assert (await get(page, "/elsewhere")).status_code == 404


async def test_mounted_behind_the_apps_own_authentication(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    class StaffOnly(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            if request.url.path.startswith("/viewmw") and request.headers.get("x-staff") != "yes":
                return PlainTextResponse("Forbidden", status_code=403)
            return await call_next(request)

    app = Starlette(
        routes=[Mount("/viewmw", app=page_for(SEEDED, real_redis, sqlite_store, settings))],
        middleware=[Middleware(StaffOnly)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://site") as client:
        assert (await client.get("/viewmw/")).status_code == 403
        staff = {"x-staff": "yes"}
        shown = await client.get("/viewmw/", headers=staff)
        assert shown.status_code == 200
        assert top_list(parse(shown.text), "story", "Today") == [("17", 9), ("4", 4)]
        assert (await client.get("/viewmw/other", headers=staff)).status_code == 404
        redirect = await client.get("/viewmw", headers=staff)
        assert redirect.status_code in (307, 308)


async def test_lifespan_and_websockets_are_answered(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    page = page_for(SEEDED, real_redis, sqlite_store, settings)
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return next(incoming)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await page({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    messages = await drive(page, {**http_scope("/"), "type": "websocket"})
    assert [m["type"] for m in messages] == ["websocket.close"]
    assert header((await drive(page, http_scope("/")))[0], b"cache-control") == b"no-store"


# Construction -----------------------------------------------------------------------------------


async def test_default_periods_are_today_and_the_last_seven_days_of_the_analytics_api(
    real_redis: aioredis.Redis,
    sqlite_store: Store,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Period:
        @classmethod
        def today(cls) -> str:
            return "today"

        @classmethod
        def last_days(cls, n: int) -> str:
            return f"{n}d"

    monkeypatch.setitem(sys.modules, "viewmw.analytics", types.SimpleNamespace(Period=Period))
    stats = SeededStats(SEEDED.top_lists, SEEDED.blocked_counts)
    page = StatsPage(stats, ViewTracker(real_redis, sqlite_store, settings))

    assert dict(page.periods) == {"Today": "today", "Last 7 days": "7d"}
    assert top_list(parse((await get(page)).text), "story", "Last 7 days")[0] == ("4", 31)

    monkeypatch.setitem(sys.modules, "viewmw.analytics", None)  # not installed: import fails
    with pytest.raises(ConfigurationError, match="periods"):
        StatsPage(stats, ViewTracker(real_redis, sqlite_store, settings))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"top_limit": 0}, "top_limit"),
        ({"sync_history": 0}, "sync_history"),
        ({"panel_timeout": 0}, "panel_timeout"),
        ({"concurrent_reads": 0}, "concurrent_reads"),
        ({"periods": {}}, "periods"),
        ({"content_types": ["no spaces"]}, "content type"),
    ],
)
def test_bad_options_fail_at_construction(
    fake_redis: aioredis.Redis, options: dict[str, object], named: str
) -> None:
    tracker = ViewTracker(
        fake_redis, Store.from_url("sqlite+aiosqlite://"), Settings(secret="s" * 16)
    )
    with pytest.raises((ConfigurationError, ValueError), match=named):
        StatsPage(SEEDED, tracker, **{"periods": PERIODS, **options})  # type: ignore[arg-type]


def test_a_missing_chromium_fails_the_browser_tests_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("VIEWMW_TEST_CHROMIUM", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium()
    monkeypatch.setenv("VIEWMW_TEST_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium()


def test_a_tracker_without_a_store_is_refused(fake_redis: aioredis.Redis) -> None:
    tracker = ViewTracker(fake_redis, None, Settings(secret="s" * 16))
    with pytest.raises(ConfigurationError, match="store"):
        StatsPage(SEEDED, tracker, periods=PERIODS)
