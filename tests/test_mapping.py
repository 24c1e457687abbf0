"""Where counts go: the app's mapping, recorded in Redis, and a sync that would move them elsewhere.

The getting-started path declares ``story -> stories.view_count`` in code only (the middleware's
``content_tables=``); ``viewmw sync`` reads ``VIEWMW_CONTENT_TABLES``, which is not set. The sync
must not move story views into the generic table: it refuses the type, says where the app counts
it and where it would have gone, and leaves the views pending. Once the command reads the same
declaration (``VIEWMW_CONTENT_TABLES_MODULE``), it syncs them into the app's table.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select, text

from tests.asgi_support import drive, header, http_scope, plain_app
from tests.conftest import CONTENT_TABLES, stories
from tests.support import DATABASE_URL, GENEROUS_DEADLINES, REDIS_URL
from tests.test_sync import CONTENTS, KEYS, World, backends, world
from viewmw import Settings, Store, ViewTracker
from viewmw.cli import EXIT_OK, EXIT_UNAVAILABLE, main
from viewmw.mapping import GENERIC_FIELD, mapping_conflicts, record_mapping
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.store import view_counts

__all__ = ["backends", "world"]  # fixtures, imported to be used here

ROUTES = {"/stories/{id:int}": "story", "/tasks/{id}": "task"}
APP_SECRET = "mapping-secret-0123456789"
BROWSER = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@pytest.fixture
def command_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """What getting-started sets for the command: the servers, and no content tables."""
    for name in [name for name in os.environ if name.startswith("VIEWMW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VIEWMW_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", DATABASE_URL)
    yield monkeypatch


async def visit(app: ViewTrackingMiddleware, path: str, reader: int) -> bytes | None:
    """One visit by reader ``reader`` (an anonymous viewer of its own); the count shown."""
    sent = await drive(
        app,
        http_scope(path, headers=[(b"user-agent", BROWSER)], client=(f"203.0.113.{reader}", 443)),
    )
    return header(sent[0], b"x-view-count")


async def story_row(store: Store, story_id: int) -> int:
    async with store.engine.connect() as connection:
        value = await connection.scalar(
            select(stories.c.view_count).where(stories.c.id == story_id)
        )
    return int(value)


async def generic_rows(store: Store) -> dict[tuple[str, str], int]:
    async with store.engine.connect() as connection:
        rows = await connection.execute(select(view_counts))
        return {(row.content_type, row.content_id): row.view_count for row in rows}


async def pending(redis: aioredis.Redis, content_type: str, content_id: str) -> int:
    return int(await redis.get(KEYS.pending(content_type, content_id)) or 0)


async def test_getting_started_a_mapping_declared_only_in_the_app(
    real_redis: aioredis.Redis,
    pg_store: Store,
    command_environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pg_store.engine.begin() as connection:
        await connection.execute(text("INSERT INTO stories (id) VALUES (1)"))
    app = ViewTrackingMiddleware(
        plain_app(),
        routes=ROUTES,
        settings=Settings(
            redis_url=REDIS_URL, database_url=DATABASE_URL, secret=APP_SECRET, **GENEROUS_DEADLINES
        ),
        content_tables=CONTENT_TABLES,
    )
    await app.startup()
    try:
        assert [await visit(app, "/stories/1", reader) for reader in range(3)] == [b"1", b"2", b"3"]
        assert [await visit(app, "/tasks/write-docs", reader) for reader in range(2)] == [
            b"1",
            b"2",
        ]
        assert await real_redis.hget(KEYS.mapping, "story") == b"stories.view_count"

        # The command, as getting-started runs it: it does not know the app's mapping.
        with caplog.at_level(logging.WARNING, logger="viewmw.sync"):
            code = await asyncio.to_thread(main, ["sync"])
        assert code == EXIT_UNAVAILABLE
        out, err = capsys.readouterr()
        assert out.startswith("synced 2 views of 1 contents")
        story_line = (
            "viewmw: not syncing content type 'story': the app counts it in stories.view_count, "
            "but this sync would move its views into viewmw_view_counts (the generic table). "
            "Its views stay pending; declare story=stories.view_count in VIEWMW_CONTENT_TABLES"
        )
        assert [line for line in err.splitlines() if line.startswith(story_line)], err
        assert "VIEWMW_CONTENT_TABLES" in err
        assert any("'story'" in record.getMessage() for record in caplog.records)
        # Nothing went to the wrong table; nothing was lost.
        assert await generic_rows(pg_store) == {("task", "write-docs"): 2}
        assert await story_row(pg_store, 1) == 0
        assert await pending(real_redis, "story", "1") == 3
        assert await real_redis.sismember(KEYS.dirty, "story:1")

        # The command reads the app's own declaration: the views go where the app reads them.
        command_environment.setenv("VIEWMW_CONTENT_TABLES_MODULE", "tests.conftest:CONTENT_TABLES")
        assert await asyncio.to_thread(main, ["sync"]) == EXIT_OK
        capsys.readouterr()
        assert await story_row(pg_store, 1) == 3
        assert await pending(real_redis, "story", "1") == 0
        assert await generic_rows(pg_store) == {("task", "write-docs"): 2}
        assert await visit(app, "/stories/1", 99) == b"4"
    finally:
        await app.aclose()


@pytest.mark.parametrize("app_maps_story", [True, False], ids=["app-maps", "sync-maps"])
async def test_a_sync_refuses_a_type_it_would_move_elsewhere_and_keeps_its_views(
    world: World, app_maps_story: bool, caplog: pytest.LogCaptureFixture
) -> None:
    await world.seed()
    await world.traffic(range(2))
    unmapped = Store(world.store.engine)  # the same database, no content tables
    app_store, sync_store = (world.store, unmapped) if app_maps_story else (unmapped, world.store)
    assert await record_mapping(world.redis, KEYS, app_store)
    world.store = sync_store

    with caplog.at_level(logging.WARNING, logger="viewmw.sync"):
        report = await world.sync().run()

    assert list(report.refused) == ["fantasy", "story"]  # mapped on one side only
    places = ("stories.view_count", "viewmw_view_counts (the generic table)")
    app_place, sync_place = places if app_maps_story else places[::-1]
    assert f"the app counts it in {app_place}" in report.refused["story"]
    assert f"would move its views into {sync_place}" in report.refused["story"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == list(
        report.refused.values()
    )
    assert report.views == 10  # the tasks, which both place in the generic table
    # Read as the app does: the tasks are in the database, the story views still pending.
    world.store = app_store
    world.tracker = ViewTracker(world.redis, app_store, world.settings, clock=world.clock)
    for content in CONTENTS:
        database = await world.tracker.get_database_view_count(*content)
        pending_views = (await world.parts(content))[0]
        assert (database, pending_views) == ((0, 2) if content[0] == "story" else (2, 0))
    await world.check_conservation()

    # The sync's mapping now agrees with the app's: the kept views move, once.
    report = await world.sync().run()
    assert (report.refused, report.views) == ({}, 10)
    await world.check_settled()


async def test_nothing_recorded_means_nothing_refused(world: World) -> None:
    """An app that does not record its mapping (an older version, its own tracker)."""
    await world.seed()
    await world.traffic(range(1))
    assert await mapping_conflicts(world.redis, KEYS, Store(world.store.engine)) == {}
    report = await world.sync().run()
    assert (report.refused, report.views) == ({}, 10)
    await world.check_settled()


async def test_the_recorded_mapping_names_every_mapped_type_and_the_generic_table(
    fake_redis: aioredis.Redis, sqlite_store: Store
) -> None:
    assert await record_mapping(fake_redis, KEYS, sqlite_store)
    recorded = await fake_redis.hgetall(KEYS.mapping)
    assert recorded == {
        GENERIC_FIELD.encode(): b"viewmw_view_counts",
        b"story": b"stories.view_count",
        b"fantasy": b"fantasies.view_count",
    }
    assert await mapping_conflicts(fake_redis, KEYS, sqlite_store) == {}


async def test_recording_never_raises(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    down = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        with caplog.at_level(logging.WARNING, logger="viewmw"):
            assert not await record_mapping(down, KEYS, sqlite_store)
    finally:
        await down.aclose()
    assert "could not record the content table mapping" in caplog.text
