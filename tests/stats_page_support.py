"""The stats page's test helpers: a seeded stats source, ledger rows, and headless Chromium.

``python -m tests.stats_page_support docs/images/stats-page.png`` serves a demo page (fakeredis
and a temporary SQLite, no server needed) and screenshots it in Chromium for the docs
(``nox -s screenshot``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import fakeredis
import pytest
import redis.asyncio as aioredis

from viewmw import Settings, Store, ViewTracker
from viewmw.outage.failover import ResilientTracker
from viewmw.stats_page import StatsPage
from viewmw.store import sync_batches

# The page's periods for a seeded source: heading -> the key the source answers for.
PERIODS = {"Today": "today", "Last 7 days": "7d"}

HOW_TO_INSTALL_CHROMIUM = (
    "Chromium is not installed: the `browser` tests render the stats page in headless "
    "Chromium. Install it with `apt-get install chromium` (Debian) or set VIEWMW_TEST_CHROMIUM "
    "to its path."
)


class SeededStats:
    """A stats source answering from fixed numbers, per content type and period key.

    ``calls`` records every question, so a test can see what the page asked.
    """

    def __init__(
        self,
        top: Mapping[tuple[str, str], list[tuple[str, int]]],
        blocked: Mapping[str, dict[str, int]],
    ) -> None:
        self.top_lists = top
        self.blocked_counts = blocked
        self.calls: list[tuple[str, ...]] = []

    async def top(self, content_type: str, period: str, limit: int = 10) -> list[tuple[str, int]]:
        self.calls.append(("top", content_type, period, str(limit)))
        return self.top_lists.get((content_type, period), [])[:limit]

    async def blocked(self, period: str) -> dict[str, int]:
        self.calls.append(("blocked", period))
        return dict(self.blocked_counts.get(period, {}))


async def commit_batches(store: Store, batches: Sequence[Mapping[tuple[str, str], int]]) -> None:
    """Commit each delta set through the ledger as one batch (``b1``, ``b2``…, oldest first)."""
    for number, deltas in enumerate(batches, 1):
        started = datetime.now(UTC)
        assert await store.commit_batch(f"b{number}", started, deltas)


def chromium() -> str:
    """The Chromium binary, or the test fails saying how to install it."""
    path = shutil.which(os.environ.get("VIEWMW_TEST_CHROMIUM") or "chromium")
    if path is None:
        pytest.fail(HOW_TO_INSTALL_CHROMIUM, pytrace=False)
    return path


async def run_chromium(*arguments: str, seconds: float = 90.0) -> str:
    """Run headless Chromium with ``arguments``; return its standard output.

    A subprocess awaited without blocking the event loop: the page's server runs in this loop.
    Each run has its own profile directory, so parallel runs never share one.
    """
    with tempfile.TemporaryDirectory(prefix="viewmw-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *arguments,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(seconds):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"Chromium did not finish within {seconds:g}s") from None
    if process.returncode != 0:
        raise AssertionError(f"Chromium exited {process.returncode}:\n{err.decode()[-3000:]}")
    return out.decode()


async def dump_dom(url: str) -> str:
    """The DOM Chromium built for ``url``, serialised as HTML."""
    return await run_chromium("--dump-dom", url)


async def screenshot(url: str, path: str, size: tuple[int, int] = (1200, 900)) -> None:
    """A PNG of ``url`` as Chromium renders it in a window of ``size`` (``path`` absolute)."""
    await run_chromium(f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url)


class Element:
    """One element of a parsed page: enough of a DOM to ask what a page shows."""

    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[Element | str] = []

    def text(self) -> str:
        """The text inside, whitespace collapsed."""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join(" ".join(parts).split())

    def walk(self) -> Iterator[Element]:
        """This element and every element inside it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """The elements with ``tag`` (any if None) whose attributes have these values
        (``data_period="today"`` for ``data-period``; ``class_`` for ``class``)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        return [
            element
            for element in self.walk()
            if (tag is None or element.tag == tag)
            and all(element.attrs.get(name) == value for name, value in wanted.items())
        ]

    def find(self, tag: str | None = None, **attrs: str) -> Element:
        """The only element matching (see :meth:`find_all`)."""
        (found,) = self.find_all(tag, **attrs)
        return found

    def rows(self) -> list[list[str]]:
        """The texts of the cells of each body row of the table(s) inside."""
        return [
            [cell.text() for cell in row.children if isinstance(cell, Element)]
            for body in self.find_all("tbody")
            for row in body.find_all("tr")
        ]


_VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "source", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        self._open[-1].children.append(element)
        if tag not in _VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def parse(html: str) -> Element:
    """The page as a tree of :class:`Element`."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def top_list(page: Element, content_type: str, period: str) -> list[tuple[str, int]] | str:
    """``(id, views)`` of one top list as shown, or the text it shows instead of a table."""
    cell = page.find("section", data_type=content_type).find("div", data_period=period)
    if not cell.find_all("tbody"):
        return cell.find("p").text()
    return [(content_id, int(views.replace(",", ""))) for _, content_id, views in cell.rows()]


# The demo page of the docs' screenshot ------------------------------------------------------------

DEMO_STATS = SeededStats(
    top={
        ("story", "today"): [
            ("1842", 312),
            ("1790", 254),
            ("1911", 198),
            ("1650", 91),
            ("1004", 47),
        ],
        ("story", "7d"): [
            ("1790", 2210),
            ("1842", 1904),
            ("1650", 1377),
            ("1911", 880),
            ("977", 612),
        ],
        ("fantasy", "today"): [("88", 140), ("412", 76), ("35", 12)],
        ("fantasy", "7d"): [("88", 991), ("35", 530), ("412", 402), ("301", 117)],
    },
    blocked={
        "today": {"cooldown": 214, "viewed_today": 1309, "session_limit": 18, "daily_limit": 3},
        "7d": {"cooldown": 1790, "viewed_today": 9921, "session_limit": 140, "daily_limit": 41},
    },
)
DEMO_SYNC_VIEWS = [410, 380, 902, 1210, 1504, 1388, 990, 620, 455, 302, 280, 512, 1820, 2403]


async def _demo_ledger(store: Store) -> None:
    """Hourly syncs over the last hours, written into the ledger as the sync writes them."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = [
        {
            "batch_id": f"{(now - timedelta(hours=age)):%Y%m%dT%H}00-demo",
            "started_at": now - timedelta(hours=age),
            "committed_at": now - timedelta(hours=age) + timedelta(seconds=2 + views / 500),
            "contents": max(views // 7, 1),
            "views": views,
        }
        for age, views in zip(range(len(DEMO_SYNC_VIEWS) - 1, -1, -1), DEMO_SYNC_VIEWS, strict=True)
    ]
    async with store.engine.begin() as connection:
        await connection.execute(sync_batches.insert(), rows)


async def make_screenshot(path: str) -> None:
    """Serve the demo page and screenshot it into ``path``."""
    from tests.asgi_support import served

    with tempfile.TemporaryDirectory() as directory:
        store = Store.from_url(f"sqlite+aiosqlite:///{directory}/demo.sqlite3")
        redis: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        try:
            await store.create_tables()
            await _demo_ledger(store)
            settings = Settings(secret="demo-secret-0123456789", content_tables={})
            tracker = ResilientTracker(ViewTracker(redis, store, settings))
            page = StatsPage(
                DEMO_STATS, tracker, content_types=["story", "fantasy"], periods=PERIODS
            )
            async with served(page) as url:
                await screenshot(f"{url}/", path)
        finally:
            await redis.aclose()
            await store.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(
        make_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/stats-page.png"))
    )
