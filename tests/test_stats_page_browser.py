"""The stats page in a real browser: uvicorn serves it, headless Chromium renders it.

Marked ``browser`` (deselected by default): run with ``nox -s tests-browser``. Chromium's
``--dump-dom`` prints the DOM it built after loading the page, so these tests see what a reader
of the page is shown, parsed by the browser's own HTML parser.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.asgi_support import served
from tests.stats_page_support import PERIODS, SeededStats, commit_batches, dump_dom, parse, top_list
from viewmw import Settings, Store, ViewTracker
from viewmw.outage.failover import ResilientTracker
from viewmw.stats_page import StatsPage

pytestmark = pytest.mark.browser

STATS = SeededStats(
    top={
        ("story", "today"): [("1842", 312), ("1790", 254)],
        ("story", "7d"): [("1790", 2210), ("1842", 1904), ("1650", 1377)],
        ("fantasy", "7d"): [("88", 991)],
    },
    blocked={"today": {"viewed_today": 12}, "7d": {"cooldown": 5, "viewed_today": 40}},
)


async def test_chromium_shows_the_seeded_top_contents_and_the_sync_history(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings
) -> None:
    await commit_batches(
        pg_store,
        [
            {("article", "1"): 40},
            {("article", "1"): 2, ("article", "2"): 8},
            {("article", "9"): 25},
        ],
    )
    tracker = ResilientTracker(ViewTracker(real_redis, pg_store, settings))
    app = StatsPage(STATS, tracker, periods=PERIODS)

    async with served(app) as url:
        page = parse(await dump_dom(f"{url}/"))

    assert top_list(page, "story", "Today") == [("1842", 312), ("1790", 254)]
    assert top_list(page, "story", "Last 7 days") == [
        ("1790", 2210),
        ("1842", 1904),
        ("1650", 1377),
    ]
    assert top_list(page, "fantasy", "Today") == "No views."
    assert top_list(page, "fantasy", "Last 7 days") == [("88", 991)]
    # The chart's bars, oldest first, and the numbers drawn above them.
    bars = page.find("svg", id="sync-chart").find_all("g", class_="bar")
    assert [bar.attrs["data-views"] for bar in bars] == ["40", "10", "25"]
    assert [bar.find("text").text() for bar in bars] == ["40", "10", "25"]
    assert bars[1].find("title").text().startswith("batch b2: 10 views of 2 contents")
    assert page.find("p", id="health-verdict").text() == "Healthy"
    assert page.find("p", id="breaker").find("strong").text() == "closed"


async def test_chromium_shows_unavailable_for_a_failing_panel(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings
) -> None:
    class BrokenTop(SeededStats):
        async def top(
            self, content_type: str, period: str, limit: int = 10
        ) -> list[tuple[str, int]]:
            raise ConnectionError("analytics down")

    app = StatsPage(
        BrokenTop({}, STATS.blocked_counts),
        ViewTracker(real_redis, sqlite_store, settings),
        content_types=["story"],
        periods=PERIODS,
    )
    async with served(app) as url:
        page = parse(await dump_dom(f"{url}/"))

    assert top_list(page, "story", "Today") == "unavailable (ConnectionError)"
    assert page.find("section", id="syncs").find("p").text() == "No sync has committed yet."
    blocked = page.find("section", id="blocked").find("tr", data_reason="viewed_today")
    assert blocked.text() == "viewed_today 12 40"
