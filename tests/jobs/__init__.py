"""Tests of the Dramatiq wiring (``viewmw.jobs``): actors on a stub broker, the schedule, real
workers.

Helpers shared by these tests live here; ``conftest.py`` sets the worker's environment before
``viewmw.jobs`` is imported.
"""

from __future__ import annotations

from sqlalchemy import text

from viewmw import KeySchema, Store, ViewTracker

QUEUE = "viewmw"
KEYS = KeySchema()  # the worker tests run without a key prefix

Content = tuple[str, str]


async def add_stories(store: Store, ids: range | list[int]) -> None:
    """Rows for the mapped ``story`` type (views of a story without a row are dropped)."""
    async with store.engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO stories (id) VALUES (:id)"), [{"id": i} for i in ids]
        )


async def record(tracker: ViewTracker, views: dict[Content, int]) -> None:
    """Count ``views[(type, id)]`` views of each content, each by a different viewer."""
    for (content_type, content_id), amount in views.items():
        for n in range(amount):
            result = await tracker.track_view(content_type, content_id, f"user:v{n}")
            assert result.counted, result


async def database_counts(store: Store, contents: list[Content]) -> dict[Content, int]:
    """What the database holds for each content."""
    return {content: await store.read_count(*content) for content in contents}


async def redis_counts(tracker: ViewTracker, contents: list[Content]) -> dict[Content, int]:
    """Views of each content still in Redis (pending + syncing)."""
    return {content: await tracker.get_redis_view_count(*content) for content in contents}


async def ledger_size(store: Store) -> int:
    """Batches the sync ledger holds."""
    async with store.engine.connect() as connection:
        result = await connection.execute(text("SELECT count(*) FROM viewmw_sync_batches"))
        return int(result.scalar_one())
