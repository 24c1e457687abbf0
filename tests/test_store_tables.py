"""The tables viewmw creates: count columns are indexed, the history's key carries its counts
(PostgreSQL), on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import event, inspect, text

from viewmw import Store
from viewmw.history_sql import HistoryReader
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
FIRST_DAY = date(2026, 3, 1)
DAYS = [FIRST_DAY + timedelta(days=n) for n in range(4)]


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
    """Two contents' views on each of DAYS, one sync batch (1, 2, 3, 4 and 10, 20, 30, 40)."""
    days = [
        DayDelta("article", content_id, day, views=(n + 1) * scale, crawler_views=1)
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


async def test_the_history_key_carries_the_counts_on_postgresql(pg_store: Store) -> None:
    key = await history_key(pg_store)
    assert key.endswith(
        "USING btree (content_type, content_id, day) INCLUDE (views, crawler_views, unique_viewers)"
    )

    await pg_store.create_tables()

    assert await history_key(pg_store) == key


async def test_a_period_sums_from_the_history_key_alone(pg_store: Store) -> None:
    """The statement :meth:`HistoryReader.totals` runs, planned with heap reads made costly
    (sequential and bitmap scans off): its rows come from the key, no heap page read."""
    await write_days(pg_store, "b1")
    async with pg_store.engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.exec_driver_sql("VACUUM ANALYZE viewmw_daily_views")
    statements: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        statements.append((args[2], args[3]))  # (conn, cursor, statement, parameters, ...)

    event.listen(pg_store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        assert await period_sums(pg_store) == {"a": (5, 2), "b": (50, 2)}
    finally:
        event.remove(pg_store.engine.sync_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    async with pg_store.engine.connect() as connection:
        await connection.exec_driver_sql("SET enable_seqscan = off")
        await connection.exec_driver_sql("SET enable_bitmapscan = off")
        plan = "\n".join(
            (
                await connection.exec_driver_sql(
                    "EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters
                )
            ).scalars()
        )
    assert "Index Only Scan using viewmw_daily_views_pkey" in plan, plan
    assert "Heap Fetches: 0" in plan, plan


async def test_a_history_table_from_before_keeps_its_key_and_stays_exact(
    pg_store: Store,
) -> None:
    async with pg_store.engine.begin() as connection:
        await connection.exec_driver_sql("DROP TABLE viewmw_daily_views")
        await connection.exec_driver_sql(_HISTORY_BEFORE_THE_COVERING_KEY)
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
