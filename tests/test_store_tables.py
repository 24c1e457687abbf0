"""The tables viewmw creates: count columns are indexed, on PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect

from viewmw import Store


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
