"""The outbox: group writes, idempotent retries, a memory bound, counts and order."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from viewmw import Outbox, OutboxEvent, Store
from viewmw.outage.outbox import outbox_events


def event(n: int, content_id: str = "1", at: float = 1000.0) -> OutboxEvent:
    return OutboxEvent(f"e{n:030d}", at + n, "story", content_id, f"user:{n}")


async def rows(outbox: Outbox) -> int:
    async with outbox.engine.connect() as connection:
        return int(
            (await connection.execute(select(func.count()).select_from(outbox_events))).scalar_one()
        )


async def test_concurrent_adds_are_written_together_and_durable(store: Store) -> None:
    outbox = Outbox(store.engine)
    written = await asyncio.gather(*(outbox.add(event(n)) for n in range(200)))
    assert written == [True] * 200
    assert await rows(outbox) == 200
    assert outbox.in_memory == 0
    assert await outbox.counts("story", ["1", "2"]) == {"1": 200, "2": 0}


async def test_events_come_back_oldest_first(store: Store) -> None:
    outbox = Outbox(store.engine)
    for n in (5, 1, 3, 2, 4):
        assert await outbox.add(event(n))
    oldest = await outbox.oldest(3)
    assert [e.event_id for e in oldest] == [event(n).event_id for n in (1, 2, 3)]
    assert oldest[0] == event(1)
    await outbox.remove(e.event_id for e in oldest)
    assert [e.event_id for e in await outbox.oldest(10)] == [event(4).event_id, event(5).event_id]


async def test_a_write_repeated_after_a_lost_answer_stores_each_event_once(store: Store) -> None:
    outbox = Outbox(store.engine)
    assert await outbox.add(event(1))
    assert await outbox.add(event(1))  # the same id again: as a retry after a lost answer
    assert await rows(outbox) == 1


async def test_a_failing_database_keeps_events_in_memory_until_it_accepts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/late.sqlite3")
    outbox = Outbox(engine, retry_seconds=3600)  # retried by hand below
    try:
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            assert await outbox.add(event(1)) is False  # no table yet: the write fails
        assert outbox.in_memory == 1 and outbox.in_memory_for("story", "1") == 1
        assert any("outbox" in r.getMessage() for r in caplog.records)
        await Store(engine).create_tables()
        assert await outbox.write_unwritten()
        assert outbox.in_memory == 0 and await rows(outbox) == 1
    finally:
        await outbox.aclose()
        await engine.dispose()


async def test_the_memory_bound_drops_and_counts(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/full.sqlite3")
    outbox = Outbox(engine, max_unwritten=2, retry_seconds=3600)
    try:
        results = [await outbox.add(event(n)) for n in range(4)]
        assert results == [False] * 4
        assert outbox.in_memory == 2 and outbox.dropped == 2
    finally:
        await outbox.aclose(write_seconds=1.0)
        await engine.dispose()


async def test_shutdown_writes_what_is_still_in_memory(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/close.sqlite3")
    outbox = Outbox(engine, retry_seconds=3600)
    try:
        assert await outbox.add(event(1)) is False
        await Store(engine).create_tables()
        await outbox.aclose()
        assert outbox.in_memory == 0 and await rows(outbox) == 1
    finally:
        await engine.dispose()


async def test_a_caller_that_stops_waiting_does_not_stop_the_write(store: Store) -> None:
    outbox = Outbox(store.engine)
    waiting = asyncio.ensure_future(outbox.add(event(1)))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert outbox._writer is not None
    await outbox._writer
    assert await rows(outbox) == 1
    stats = await outbox.stats()
    assert stats["outbox_events"] == 1 and stats["outbox_oldest"] == 1001.0
