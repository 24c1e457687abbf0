"""Views of rows that do not exist in a mapped table: kept, reported, listed, never lost.

Through the sync on the real Redis with PostgreSQL and with SQLite (``real_world``), and at the
store's level on both databases. ``story`` and ``fantasy`` map to tables of their own; the tests
insert story rows 1-5 (:meth:`World.seed`) and no fantasy rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select

from tests.conftest import stories
from tests.test_sync import Hook, InjectedCrash, World, real_world
from viewmw import Store
from viewmw import store as store_module
from viewmw.store import CommitResult, unmatched_views

__all__ = ["real_world"]  # the fixture, shared with test_sync.py

MISSING = [("story", "77"), ("story", "78"), ("fantasy", "9")]
EXISTING = [("story", "1"), ("task", "t1")]


async def offer(world: World, contents: list[tuple[str, str]], viewers: range) -> None:
    for viewer in viewers:
        for content in contents:
            assert (await world.view(content, f"user:{viewer}")).counted


async def story_row(world: World, story_id: int) -> int:
    async with world.store.engine.connect() as connection:
        query = select(stories.c.view_count).where(stories.c.id == story_id)
        return int((await connection.execute(query)).scalar_one())


async def test_views_of_missing_rows_are_kept_reported_and_listed(
    real_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world = real_world.permissive()
    await world.seed()
    await offer(world, EXISTING + MISSING, range(3))

    with caplog.at_level(logging.WARNING, logger="viewmw.sync"):
        report = await world.sync().run()

    assert (report.views, report.contents) == (15, 5)
    assert (report.unmatched_views, report.unmatched_contents) == (9, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "9 views of 3 contents" in warnings[0]
    assert "fantasy: 3, story: 6" in warnings[0]
    kept = await world.store.unmatched_views()
    assert sorted((e.content_type, e.content_id, e.view_count) for e in kept) == [
        ("fantasy", "9", 3),
        ("story", "77", 3),
        ("story", "78", 3),
    ]
    assert all(e.first_seen == e.last_seen for e in kept)
    assert await world.store.unmatched_totals() == (3, 9)
    assert await story_row(world, 1) == 3
    # Nothing lost: database (rows and kept views) + pending + syncing = accepted, and the
    # ledger's batches add up to every view accepted.
    await world.check_settled()
    assert (await world.tracker.get_view_count("story", "77")) == 3


async def test_kept_views_add_up_across_syncs(real_world: World) -> None:
    world = real_world.permissive()
    await world.seed()
    await offer(world, MISSING[:1], range(2))
    await world.sync().run()
    (first,) = await world.store.unmatched_views()

    await offer(world, MISSING[:1] + EXISTING, range(2, 5))
    report = await world.sync().run()

    assert (report.unmatched_views, report.unmatched_contents) == (3, 1)
    (again,) = await world.store.unmatched_views()
    assert (again.content_type, again.content_id, again.view_count) == ("story", "77", 5)
    assert again.first_seen == first.first_seen
    assert again.last_seen >= first.last_seen
    await world.check_settled()


async def test_retry_moves_kept_views_into_rows_that_exist_now(real_world: World) -> None:
    world = real_world.permissive()
    await world.seed()
    await offer(world, MISSING, range(2))
    await world.sync().run()
    async with world.store.engine.begin() as connection:
        await connection.execute(stories.insert(), [{"id": 77, "view_count": 0}])
    shown = await world.tracker.get_view_count("story", "77")

    moved = await world.store.retry_unmatched()

    assert moved == {("story", "77"): 2}
    assert await story_row(world, 77) == 2
    kept = await world.store.unmatched_views()
    assert sorted((e.content_type, e.content_id) for e in kept) == [
        ("fantasy", "9"),
        ("story", "78"),
    ]
    # The displayed count does not move: it included the kept views already.
    assert await world.tracker.get_view_count("story", "77") == shown
    await world.check_settled()
    assert await world.store.retry_unmatched() == {}


async def test_a_sync_that_dies_after_the_commit_keeps_the_views_once(real_world: World) -> None:
    world = real_world.permissive()
    await world.seed()
    await offer(world, EXISTING + MISSING, range(2))
    hook = Hook()
    hook.crash_at("committed")
    with pytest.raises(InjectedCrash):
        await world.sync(on_step=hook).run()
    await world.check_conservation()

    report = await world.sync().run()  # finds the batch in the ledger: only settles it

    assert (report.recovered_batches, report.unmatched_views) == (1, 0)
    assert await world.store.unmatched_totals() == (3, 6)
    await world.check_settled()


# At the store's level -----------------------------------------------------------------------------


@pytest.fixture
def statements(store: Store) -> Iterator[list[str]]:
    """The SQL statements the store sends (an executemany is one)."""
    sent: list[str] = []

    def record(*args: object) -> None:
        sent.append(str(args[2]))

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    yield sent
    event.remove(store.engine.sync_engine, "before_cursor_execute", record)


async def seed_stories(store: Store, ids: range) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(stories.insert(), [{"id": i, "view_count": 0} for i in ids])


async def test_missing_rows_are_found_in_bulk_not_row_by_row(
    store: Store, statements: list[str]
) -> None:
    await seed_stories(store, range(1, 301))
    now = datetime.now(UTC)
    small = {("story", str(i)): 1 for i in (1, 2, 1001, 1002)}
    large = {("story", str(i)): 2 for i in [*range(1, 301), *range(1001, 1301)]}

    await store.commit_batch("warm-up", now, small)  # a new connection sends its own queries
    statements.clear()
    await store.commit_batch("small", now, small)
    small_statements = len(statements)
    statements.clear()
    result = await store.commit_batch("large", now, large)

    assert len(statements) == small_statements <= 5, statements
    assert result.committed and result
    assert result.unmatched == {("story", str(i)): 2 for i in range(1001, 1301)}
    assert result.unmatched_views == 600
    counts, _ = await store.read_counts("story", ["1", "300", "1001", "1300"])
    assert counts == {"1": 4, "300": 2, "1001": 4, "1300": 2}


async def test_missing_rows_spread_over_several_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHUNK_ROWS", 3)
    await seed_stories(store, range(1, 6))
    deltas = {("story", str(i)): i for i in range(1, 11)}

    result = await store.commit_batch("chunked", datetime.now(UTC), deltas)

    assert result.unmatched == {("story", str(i)): i for i in range(6, 11)}
    counts, _ = await store.read_counts("story", [str(i) for i in range(1, 11)])
    assert counts == {str(i): i for i in range(1, 11)}
    assert await store.unmatched_totals() == (5, 40)


async def test_a_batch_already_committed_changes_nothing_and_reports_nothing(store: Store) -> None:
    now = datetime.now(UTC)
    first = await store.commit_batch("b1", now, {("story", "5"): 4})
    again = await store.commit_batch("b1", now, {("story", "5"): 4})

    assert first == CommitResult(True, {("story", "5"): 4})
    assert not again and again == CommitResult(False, {})
    assert [(e.content_id, e.view_count) for e in await store.unmatched_views()] == [("5", 4)]


async def test_ids_no_row_can_have_are_kept_too(store: Store) -> None:
    """Pending views of "07" or of an id beyond BIGINT, counted before viewmw refused them."""
    await seed_stories(store, range(7, 8))
    deltas = {("story", "07"): 1, ("story", "7"): 2, ("story", "9" * 20): 3}

    result = await store.commit_batch("legacy", datetime.now(UTC), deltas)

    assert result.unmatched == {("story", "07"): 1, ("story", "9" * 20): 3}
    counts, _ = await store.read_counts("story", ["7", "07", "9" * 20])
    assert counts == {"7": 2, "07": 1, "9" * 20: 3}


async def test_unmatched_views_are_listed_most_first_and_filtered(store: Store) -> None:
    now = datetime.now(UTC)
    deltas = {("story", "1"): 1, ("story", "2"): 5, ("fantasy", "3"): 3}
    await store.commit_batch("b", now, deltas)

    listed = [(e.content_type, e.content_id) for e in await store.unmatched_views()]
    assert listed == [("story", "2"), ("fantasy", "3"), ("story", "1")]
    assert [e.content_id for e in await store.unmatched_views("story", limit=1)] == ["2"]
    async with store.engine.connect() as connection:
        rows = (await connection.execute(select(unmatched_views.c.view_count))).scalars().all()
    assert sorted(rows) == [1, 3, 5]
