"""The example site: in process on the real Redis, and served by a real uvicorn process."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from examples.site import ROUTES, SECTIONS, create_app, fantasies, stories
from tests.asgi_support import free_port
from tests.support import REDIS_URL
from viewmw import Outbox, Settings, Store, ViewTracker
from viewmw.identity import ViewerIdentity
from viewmw.outage.failover import ResilientTracker

ROOT = Path(__file__).resolve().parents[1]
BROWSER = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}
SECRET = "example-secret-0123456789"


@asynccontextmanager
async def running_site(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, client=("203.0.113.5", 1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://site") as client:
            yield app, client


def site_settings(tmp_path: Path, **changes: Any) -> Settings:
    return Settings(
        redis_url=REDIS_URL,
        database_url=f"sqlite:///{tmp_path}/site.sqlite3",
        secret=SECRET,
        **changes,
    )


async def test_detail_pages_count_and_show_their_count(
    real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_site(site_settings(tmp_path)) as (_, site):
        first = await site.get("/stories/1", headers=BROWSER)
        assert first.status_code == 200
        assert "The Lighthouse Keeper" in first.text
        assert "1 view (this visit included)" in first.text
        assert (first.headers["x-view-count"], first.headers["x-view-counted"]) == ("1", "1")
        alice = await site.get("/stories/1", headers={**BROWSER, "x-demo-user": "alice"})
        assert "2 views (this visit included)" in alice.text
        assert alice.headers["x-view-count"] == "2"
        again = await site.get("/stories/1", headers={**BROWSER, "x-demo-user": "alice"})
        assert "2 views (this visit not counted: cooldown)" in again.text
        assert again.headers["x-view-counted"] == "0; reason=cooldown"
        # The page shows its own view: the same number as the header.
        assert [count_on_page(r.text) for r in (first, alice, again)] == [1, 2, 2]
        task = await site.get("/tasks/write-docs", headers={**BROWSER, "x-demo-user": "alice"})
        assert task.headers["x-view-count"] == "1"
        missing = await site.get("/stories/99", headers=BROWSER)
        assert missing.status_code == 404 and "x-view-count" not in missing.headers
    alice = ViewerIdentity(SECRET).user_viewer("alice")  # usernames are hashed
    assert sorted(await real_redis.hkeys(f"viewed:{alice}")) == [b"story:1", b"task:write-docs"]


async def test_trending_and_views_per_day_include_todays_views(
    real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_site(site_settings(tmp_path)) as (_, site):
        for user in ("alice", "bob", "carol"):
            await site.get("/stories/3", headers={**BROWSER, "x-demo-user": user})
        detail = await site.get("/stories/1", headers={**BROWSER, "x-demo-user": "alice"})
        trending = await site.get("/trending", headers=BROWSER)

    assert trending.status_code == 200
    stories_part = trending.text.split("<h2>Stories</h2>")[1].split("<h2>")[0]
    # Night Train (3 views today) leads The Lighthouse Keeper (1), both pending in Redis.
    assert re.findall(r">([^<]+)</a> — (\d+) views?", stories_part) == [
        ("Night Train", "3"),
        ("The Lighthouse Keeper", "1"),
    ]
    assert "No views this week yet." in trending.text  # sections nobody viewed
    rows = re.findall(
        r"<tr><td>(\d{4}-\d\d-\d\d)</td><td>(\d+)</td><td>(\d*)</td></tr>", detail.text
    )
    assert len(rows) == 7
    assert rows[-1][1:] == ("1", "1")  # today: this visit, by one viewer
    assert all(row[1:] == ("0", "0") for row in rows[:-1])


async def test_the_operator_statistics_page_is_mounted(
    real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    async with running_site(site_settings(tmp_path)) as (_, site):
        await site.get("/stories/2", headers={**BROWSER, "x-demo-user": "alice"})
        page = await site.get("/viewmw/", headers=BROWSER)

    assert page.status_code == 200
    story = page.text.split('data-type="story"')[1].split("</section>")[0]
    today = story.split('data-period="Today"')[1].split("</div>")[0]
    # Story 2, viewed once today, leads today's ranking (the page shows ids).
    assert re.findall(r'<td class="id">(\w+)</td><td class="num">(\d+)</td>', today) == [("2", "1")]


async def test_list_page_reads_all_counts_in_one_batch(
    real_redis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, list[str]]] = []

    def recording(cls: Any) -> Any:
        read = cls.get_view_count_details

        async def recorded(self: Any, content_type: str, ids: Any) -> Any:
            calls.append((cls.__name__, content_type, list(ids)))
            return await read(self, content_type, ids)

        return recorded

    async with running_site(site_settings(tmp_path)) as (_, site):
        for user in ("a", "b"):
            await site.get("/fantasies/2", headers={**BROWSER, "x-demo-user": user})
        for cls in (ResilientTracker, ViewTracker):
            monkeypatch.setattr(cls, "get_view_count_details", recording(cls))
        page = await site.get("/fantasies")
    # One batch read, passed once through the resilient wrapper to the Redis tracker.
    assert calls == [
        ("ResilientTracker", "fantasy", ["1", "2"]),
        ("ViewTracker", "fantasy", ["1", "2"]),
    ]
    assert "The Glass Dragon</a> — 0 views" in page.text
    assert "Salt and Crowns</a> — 2 views" in page.text


async def test_seeds_content_tables_once(real_redis: aioredis.Redis, tmp_path: Path) -> None:
    settings = site_settings(tmp_path)
    for _ in range(2):  # a restart finds the rows and inserts nothing
        async with running_site(settings) as (app, _):
            pass
    app = create_app(settings)
    tracker: ResilientTracker = app.state.tracker
    store = tracker.tracker.store
    assert store is not None
    async with store.engine.connect() as connection:
        for table, section in ((stories, SECTIONS[0]), (fantasies, SECTIONS[1])):
            ids = (await connection.execute(select(table.c.id).order_by(table.c.id))).scalars()
            assert [str(i) for i in ids] == list(section.items)
    await store.close()
    await tracker.tracker.redis.aclose()


async def test_pages_render_and_count_when_redis_is_down(tmp_path: Path) -> None:
    settings = site_settings(tmp_path, redis_timeout=0.1).replace(
        redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    async with running_site(settings) as (_, site):
        visits = [
            await site.get("/outcomes/1", headers={**BROWSER, "x-demo-user": f"u{n}"})
            for n in range(6)
        ]
        listing = await site.get("/outcomes")
    assert {v.status_code for v in visits} == {200} and listing.status_code == 200
    # Each page shows the count its header carries, its own view included.
    assert [count_on_page(v.text) for v in visits] == [header_count(v) for v in visits]
    # Views go to the outbox: a refused connection proves the call was never sent, and after
    # three failures the breaker sends every view there. (A view whose call outlasted the
    # 0.1 s deadline on a busy machine is unknown instead: it is not offered again.)
    outcomes = [v.headers["x-view-counted"] for v in visits]
    assert outcomes[-1] == "1; queued"
    assert set(outcomes) <= {"0; reason=unavailable", "1; queued"}
    queued = outcomes.count("1; queued")
    assert "this visit waits to be counted" in visits[-1].text
    assert f"Docs published</a> — {queued} views" in listing.text
    # The views wait in the outbox, to be replayed through the rules when Redis is back.
    store = Store.from_url(settings.database_url)
    try:
        assert await Outbox(store.engine).counts("outcome", ["1"]) == {"1": queued}
    finally:
        await store.close()


def count_on_page(text: str) -> int | None:
    found = re.search(r"<p>(\d+) views? \(", text)
    return None if found is None else int(found.group(1))


def header_count(response: httpx.Response) -> int | None:
    value = response.headers.get("x-view-count")
    return None if value is None else int(value)


def test_routes_cover_every_section() -> None:
    assert sorted(v if isinstance(v, str) else v[0] for v in ROUTES.values()) == sorted(
        s.content_type for s in SECTIONS
    )


# End to end: a real uvicorn process ------------------------------------------------------------


class Server:
    """The example served by uvicorn in a subprocess; its output is read by a thread."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Block until the server prints ``text``; fail with its output if it never does."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if text in self.lines.get(timeout=remaining):
                    return
            except queue.Empty:
                break
        raise AssertionError(f"server never printed {text!r}:\n{''.join(self.output)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["python -m examples.site", "uvicorn examples.site:app"])
async def test_served_by_uvicorn_counts_over_http(
    launch: str, real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env.update(
        PORT=str(port),
        PYTHONPATH=str(ROOT),
        VIEWMW_REDIS_URL=REDIS_URL,
        VIEWMW_DATABASE_URL=f"sqlite:///{tmp_path}/e2e.sqlite3",
        VIEWMW_SECRET=SECRET,
    )
    if launch.startswith("python"):
        command = [sys.executable, "-m", "examples.site"]
    else:
        command = [sys.executable, "-m", "uvicorn", "examples.site:app", "--port", str(port)]
    server = Server(command, env, cwd=tmp_path)
    try:
        server.wait_for("Application startup complete")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            shown = []
            for user in ("ann", "ben", "ann", "cat"):
                response = await client.get("/stories/2", headers={**BROWSER, "x-demo-user": user})
                assert response.status_code == 200
                assert count_on_page(response.text) == int(response.headers["x-view-count"])
                shown.append((response.headers["x-view-count"], response.headers["x-view-counted"]))
            bot = await client.get("/stories/2", headers={"user-agent": "Googlebot/2.1"})
            listing = await client.get("/stories")
        assert shown == [("1", "1"), ("2", "1"), ("2", "0; reason=cooldown"), ("3", "1")]
        assert (bot.headers["x-view-count"], bot.headers["x-view-counted"]) == (
            "3",
            "0; reason=bot",
        )
        assert "A Map of Small Rivers</a> — 3 views" in listing.text
        assert await real_redis.get("story:views:2") == b"3"
    finally:
        code = server.stop()
    assert code in (0, 143, -signal.SIGTERM), "".join(server.output)
    assert any("Application shutdown complete" in line for line in server.output)
