"""The tables viewmw creates: count columns are indexed, the history's key carries its counts
(PostgreSQL), on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, inspect, text

from viewmw import Store
from viewmw.history_sql import HistoryReader, HistoryRow
from viewmw.store import DayDelta


async def indexed_columns(store: Store, table: str) -> list[list[str]]:
    def read(connection: Any) -> list[list[str]]:
        return [index["column_names"] for index in inspect(connection).get_indexes(table)]

    async with store.engine.connect() as connection:
        return await connection.run_sync(read)


async def test_count_columns_are_indexed(store: Store) -> None:
    """conftest's ``store`` ran ``create_tables``: ``stories`` comes from ``content_table()``."""
    assert ["content_type", "view_count"] in await indexed_columns(store, "viewmw_view_counts")
    assert ["view_count"] in await indexed_columns(store, "stories")


async def test_create_tables_adds_an_index_missing_from_an_existing_table(store: Store) -> None:
    async with store.engine.begin() as connection:
        await connection.exec_driver_sql("DROP INDEX ix_viewmw_view_counts_type_count")
    assert await indexed_columns(store, "viewmw_view_counts") == []

    await store.create_tables()

    assert await indexed_columns(store, "viewmw_view_counts") == [["content_type", "view_count"]]


# The history table as versions before the covering primary key created it.
_HISTORY_BEFORE_THE_COVERING_KEY = (
    "CREATE TABLE viewmw_daily_views (content_type VARCHAR(32) NOT NULL, "
    "content_id VARCHAR(64) NOT NULL, day DATE NOT NULL, views BIGINT DEFAULT '0' NOT NULL, "
    "unique_viewers BIGINT, crawler_views BIGINT DEFAULT '0' NOT NULL, unique_sketch BYTEA, "
    "PRIMARY KEY (content_type, content_id, day))"
)
T = TypeVar("T")
FIRST_DAY = date(2026, 3, 1)
DAYS = [FIRST_DAY + timedelta(days=n) for n in range(4)]


async def older_history_table(store: Store) -> None:
    """Replace the history table with one as versions before the covering key created it."""
    async with store.engine.begin() as connection:
        await connection.exec_driver_sql("DROP TABLE viewmw_daily_views")
        await connection.exec_driver_sql(_HISTORY_BEFORE_THE_COVERING_KEY)


async def history_key(store: Store) -> str:
    """The definition of the history table's primary key index (PostgreSQL)."""
    async with store.engine.connect() as connection:
        definition = await connection.scalar(
            text(
                "SELECT pg_get_indexdef(conindid) FROM pg_constraint "
                "WHERE conrelid = 'viewmw_daily_views'::regclass AND contype = 'p'"
            )
        )
    assert isinstance(definition, str)
    return definition


async def write_days(store: Store, batch_id: str) -> None:
    """Two contents' views on each of DAYS, one sync batch (1, 2, 3, 4 and 10, 20, 30, 40),
    each day with an estimate and a (stand-in) sketch."""
    days = [
        DayDelta(
            "article",
            content_id,
            day,
            views=(n + 1) * scale,
            crawler_views=1,
            unique_viewers=(n + 1) * scale,
            sketch=f"{content_id}{n}".encode(),
        )
        for content_id, scale in (("a", 1), ("b", 10))
        for n, day in enumerate(DAYS)
    ]
    deltas = {("article", "a"): 10, ("article", "b"): 100}
    assert (await store.commit_batch(batch_id, datetime.now(UTC), deltas, days=days)).committed


async def period_sums(store: Store) -> dict[str, tuple[int, int]]:
    """Views and crawler views of each content over the middle two days."""
    rows = await HistoryReader(store.engine).totals(
        "article", ["a", "b", "c"], DAYS[1], DAYS[2], sketches_before=None
    )
    return {row.content_id: (row.views, row.crawler_views) for row in rows}


async def vacuum(store: Store) -> None:
    """What autovacuum does: the pages written are all-visible after it."""
    async with store.engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.exec_driver_sql("VACUUM ANALYZE viewmw_daily_views")


async def planned(store: Store, read: Callable[[], Awaitable[T]]) -> tuple[str, str, T]:
    """The one statement ``read`` ran, its plan with heap reads made costly (sequential and
    bitmap scans off), and what ``read`` returned."""
    statements: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        statements.append((args[2], args[3]))  # (conn, cursor, statement, parameters, ...)

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        result = await read()
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    async with store.engine.connect() as connection:
        await connection.exec_driver_sql("SET enable_seqscan = off")
        await connection.exec_driver_sql("SET enable_bitmapscan = off")
        explained = await connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters
        )
        return statement, "\n".join(explained.scalars()), result


def reads_the_key_alone(plan: str) -> bool:
    return "Index Only Scan using viewmw_daily_views_pkey" in plan and "Heap Fetches: 0" in plan


async def test_a_period_sums_from_the_history_key_alone(pg_store: Store) -> None:
    """The statement :meth:`HistoryReader.totals` runs without sketches reads no heap page."""
    await write_days(pg_store, "b1")
    await vacuum(pg_store)

    _, plan, sums = await planned(pg_store, lambda: period_sums(pg_store))

    assert sums == {"a": (5, 2), "b": (50, 2)}
    assert reads_the_key_alone(plan), plan


@pytest.mark.parametrize("read", ["totals", "rows"])
async def test_a_period_of_live_days_names_no_sketch(pg_store: Store, read: str) -> None:
    """Days from ``sketches_before`` on keep their viewers in Redis: a period of such days
    alone names no sketch (the sums then read the key alone, as views_many makes them); one
    that starts before gets the earlier days' sketches."""
    await write_days(pg_store, "b1")
    await vacuum(pg_store)
    reader = getattr(HistoryReader(pg_store.engine), read)

    def kept(rows: list[HistoryRow]) -> list[tuple[str, date, bytes]]:
        return sorted((r.content_id, r.day, r.sketch) for r in rows if r.sketch is not None)

    statement, plan, rows = await planned(
        pg_store, lambda: reader("article", ["a", "b"], DAYS[1], DAYS[2], sketches_before=DAYS[1])
    )
    assert "unique_sketch" not in statement
    assert read == "rows" or reads_the_key_alone(plan), plan
    assert kept(rows) == []
    assert sum(row.views for row in rows) == 55

    statement, plan, rows = await planned(
        pg_store, lambda: reader("article", ["a", "b"], DAYS[1], DAYS[2], sketches_before=DAYS[2])
    )
    assert "unique_sketch" in statement
    assert kept(rows) == [("a", DAYS[1], b"a1"), ("b", DAYS[1], b"b1")]
    assert sum(row.views for row in rows) == 55


async def test_a_history_table_from_before_keeps_its_key_and_stays_exact(
    pg_store: Store,
) -> None:
    await older_history_table(pg_store)
    before = await history_key(pg_store)

    await pg_store.create_tables()
    await pg_store.create_tables()

    assert await history_key(pg_store) == before
    assert "INCLUDE" not in before
    await write_days(pg_store, "b1")
    await write_days(pg_store, "b2")
    assert await period_sums(pg_store) == {"a": (10, 4), "b": (100, 4)}


async def test_sqlite_keys_the_history_by_content_and_day(sqlite_store: Store) -> None:
    def read(connection: Any) -> list[str]:
        return list(
            inspect(connection).get_pk_constraint("viewmw_daily_views")["constrained_columns"]
        )

    await sqlite_store.create_tables()
    async with sqlite_store.engine.connect() as connection:
        assert await connection.run_sync(read) == ["content_type", "content_id", "day"]
    await write_days(sqlite_store, "b1")
    assert await period_sums(sqlite_store) == {"a": (5, 2), "b": (50, 2)}


def documented_upgrade() -> list[str]:
    """The statements docs/history.md gives for moving an older table to the covering key."""
    text_of_page = (Path(__file__).parent.parent / "docs" / "history.md").read_text()
    block = text_of_page.split("```sql\n", 1)[1].split("```", 1)[0]
    return [statement.strip() for statement in block.split(";") if statement.strip()]


async def test_the_documented_upgrade_gives_an_older_table_the_covering_key(
    pg_store: Store,
) -> None:
    await older_history_table(pg_store)
    await write_days(pg_store, "b1")

    async with pg_store.engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")  # CONCURRENTLY
        for statement in documented_upgrade():
            await connection.exec_driver_sql(statement)

    assert "INCLUDE (views, crawler_views, unique_viewers)" in await history_key(pg_store)
    await pg_store.create_tables()  # finds nothing missing
    await write_days(pg_store, "b2")
    await vacuum(pg_store)
    _, plan, sums = await planned(pg_store, lambda: period_sums(pg_store))
    assert sums == {"a": (10, 4), "b": (100, 4)}
    assert reads_the_key_alone(plan), plan
