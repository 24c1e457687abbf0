"""The outbox: views offered while Redis is unreachable, kept in the database until replayed.

Each view is an event (a unique id, when it was offered, the content and the viewer token — never
raw personal data, the token is the same hash the rules use). Events offered in one event-loop
turn are written together in one statement (group commit), and a request waits for its event to
be durable at most ``database_request_timeout``: the write goes on if it stops waiting. Events
whose write failed stay in memory (bounded) and are written again, with the same ids, by a
background retry; writing is idempotent (``ON CONFLICT DO NOTHING``), so a write whose answer was
lost is never stored twice.

The :mod:`~viewmw.outage.replayer` later feeds the events through the recording script with their
original times, exactly once, and deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Index, String, Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from viewmw.errorlog import ErrorLog
from viewmw.store import metadata

logger = logging.getLogger("viewmw")

outbox_events = Table(
    "viewmw_outbox",
    metadata,
    Column("event_id", String(32), primary_key=True),
    Column("viewed_at_ms", BigInteger, nullable=False),
    Column("content_type", String(32), nullable=False),
    Column("content_id", String(64), nullable=False),
    Column("viewer", String(80), nullable=False),
    Index("viewmw_outbox_order", "viewed_at_ms", "event_id"),
    Index("viewmw_outbox_content", "content_type", "content_id"),
)
"""Views offered while Redis was unreachable, oldest first by ``(viewed_at_ms, event_id)``."""

# Rows per INSERT: far below the drivers' parameter limits (5 columns each).
_WRITE_ROWS = 2000


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One view offered while Redis was unreachable."""

    event_id: str
    viewed_at: float
    content_type: str
    content_id: str
    viewer: str

    @classmethod
    def new(cls, content_type: str, content_id: str, viewer: str, viewed_at: float) -> OutboxEvent:
        """An event with a fresh unique id."""
        return cls(uuid.uuid4().hex, viewed_at, content_type, content_id, viewer)

    def row(self) -> dict[str, object]:
        """The event as a row of :data:`outbox_events`."""
        return {
            "event_id": self.event_id,
            # Floored: a view must be replayed in the second it was offered, never the next.
            "viewed_at_ms": math.floor(self.viewed_at * 1000),
            "content_type": self.content_type,
            "content_id": self.content_id,
            "viewer": self.viewer,
        }


class Outbox:
    """Writes outage events to the database in groups, and reads them back for the replay.

    Args:
        engine: the database viewmw's tables live in.
        max_unwritten: events held in memory at most while the database refuses them; beyond
            that new events are dropped, counted (:attr:`dropped`) and logged.
        retry_seconds: how often events whose write failed are written again.
    """

    def __init__(
        self, engine: AsyncEngine, *, max_unwritten: int = 100_000, retry_seconds: float = 1.0
    ) -> None:
        if max_unwritten < 1 or retry_seconds <= 0:
            raise ValueError("max_unwritten >= 1 and retry_seconds > 0")
        self.engine = engine
        self.max_unwritten = max_unwritten
        self.retry_seconds = retry_seconds
        self.dropped = 0
        self.written = 0
        self._queue: list[OutboxEvent] = []
        self._queued_done: asyncio.Future[bool] | None = None
        self._writing: list[OutboxEvent] = []
        self._writing_done: asyncio.Future[bool] | None = None
        self._unwritten: list[OutboxEvent] = []
        self._writer: asyncio.Task[None] | None = None
        self._retrier: asyncio.Task[None] | None = None
        self._errors = ErrorLog(
            what="writing views to the outbox", consequence="they stay in memory and are retried"
        )

    @property
    def in_memory(self) -> int:
        """Events offered to this process and not yet known to be written."""
        return len(self._queue) + len(self._writing) + len(self._unwritten)

    def in_memory_for(self, content_type: str, content_id: str) -> int:
        """Events of one content held in this process, not yet known to be written."""
        return sum(
            1
            for event in (*self._queue, *self._writing, *self._unwritten)
            if event.content_id == content_id and event.content_type == content_type
        )

    async def add(self, event: OutboxEvent) -> bool:
        """Queue ``event``; return ``True`` once it is durably written, ``False`` if the write
        failed (it is then retried in the background) or the memory bound was reached.

        Cancelling the caller (a request deadline) does not stop the write.
        """
        if self.in_memory >= self.max_unwritten:
            self._drop(1)
            return False
        loop = asyncio.get_running_loop()
        self._queue.append(event)
        if self._queued_done is None:
            self._queued_done = loop.create_future()
        done = self._queued_done
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_queued())
        return await asyncio.shield(done)

    async def _write_queued(self) -> None:
        """Write what is queued, one group at a time, until nothing is queued."""
        await asyncio.sleep(0)  # let the requests of this loop turn join the group
        while self._queue:
            # Kept visible while it is written, so a shutdown that stops the write keeps it.
            self._writing, self._queue = self._queue, []
            self._writing_done, self._queued_done = self._queued_done, None
            written = await self._write(self._writing)
            if not written:
                self._keep_unwritten(self._writing)
            _resolve(self._writing_done, written)
            self._writing, self._writing_done = [], None

    async def _write(self, events: Sequence[OutboxEvent]) -> bool:
        try:
            async with self.engine.begin() as connection:
                insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
                for start in range(0, len(events), _WRITE_ROWS):
                    rows = [event.row() for event in events[start : start + _WRITE_ROWS]]
                    statement = insert(outbox_events).values(rows).on_conflict_do_nothing()
                    await connection.execute(statement)
        except Exception as exc:
            self._errors.report(exc)
            return False
        self.written += len(events)
        return True

    def _keep_unwritten(self, events: list[OutboxEvent]) -> None:
        room = self.max_unwritten - len(self._unwritten)
        if len(events) > room:
            self._drop(len(events) - max(room, 0))
            events = events[: max(room, 0)]
        self._unwritten.extend(events)
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_periodically())

    async def _retry_periodically(self) -> None:
        while self._unwritten:
            await asyncio.sleep(self.retry_seconds)
            await self.write_unwritten()

    async def write_unwritten(self) -> bool:
        """Write the events whose earlier write failed; returns whether none is left."""
        events, self._unwritten = self._unwritten, []
        if events and not await self._write(events):
            self._unwritten = events + self._unwritten
        return not self._unwritten

    def _drop(self, how_many: int) -> None:
        self.dropped += how_many
        logger.error(
            "viewmw: the outbox holds %d unwritten views (its bound); %d views dropped so far",
            self.max_unwritten,
            self.dropped,
        )

    async def aclose(self, write_seconds: float = 5.0) -> None:
        """Write what is still in memory (call on shutdown), waiting at most ``write_seconds``;
        what cannot be written is logged."""
        for task in (self._writer, self._retrier):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Writes are idempotent: a group whose write was stopped midway is simply written again.
        self._unwritten = [*self._unwritten, *self._writing, *self._queue]
        self._queue, self._writing = [], []
        waiting = [self._queued_done, self._writing_done]
        self._queued_done = self._writing_done = None
        if self._unwritten:
            try:
                async with asyncio.timeout(write_seconds):
                    await self.write_unwritten()
            except TimeoutError:
                pass
        for done in waiting:  # their requests learn whether the views were kept after all
            _resolve(done, not self._unwritten)
        if self._unwritten:
            logger.error(
                "viewmw: %d views offered during a Redis outage could not be written and are lost",
                len(self._unwritten),
            )

    # Reading ------------------------------------------------------------------------------------

    async def oldest(self, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` events, oldest first."""
        query = (
            select(outbox_events)
            .order_by(outbox_events.c.viewed_at_ms, outbox_events.c.event_id)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [
            OutboxEvent(
                row.event_id, row.viewed_at_ms / 1000, row.content_type, row.content_id, row.viewer
            )
            for row in rows
        ]

    async def contents_of(self, event_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """The content (type, id) of each of ``event_ids`` still waiting (the others left out)."""
        ids = list(event_ids)
        found: dict[str, tuple[str, str]] = {}
        columns = (outbox_events.c.event_id, outbox_events.c.content_type)
        async with self.engine.connect() as connection:
            for start in range(0, len(ids), _WRITE_ROWS):
                query = select(*columns, outbox_events.c.content_id).where(
                    outbox_events.c.event_id.in_(ids[start : start + _WRITE_ROWS])
                )
                for row in (await connection.execute(query)).all():
                    found[row.event_id] = (row.content_type, row.content_id)
        return found

    async def remove(self, event_ids: Iterable[str]) -> None:
        """Delete replayed events."""
        ids = list(event_ids)
        async with self.engine.begin() as connection:
            for start in range(0, len(ids), _WRITE_ROWS):
                chunk = ids[start : start + _WRITE_ROWS]
                await connection.execute(
                    delete(outbox_events).where(outbox_events.c.event_id.in_(chunk))
                )

    async def counts(self, content_type: str, content_ids: Sequence[str]) -> dict[str, int]:
        """Events waiting per content (0 for none), as written to the database."""
        query = (
            select(outbox_events.c.content_id, func.count())
            .where(
                outbox_events.c.content_type == content_type,
                outbox_events.c.content_id.in_(list(content_ids)),
            )
            .group_by(outbox_events.c.content_id)
        )
        async with self.engine.connect() as connection:
            found = {row[0]: int(row[1]) for row in (await connection.execute(query)).all()}
        return {content_id: found.get(content_id, 0) for content_id in content_ids}

    async def stats(self) -> dict[str, object]:
        """Events waiting in the database, and the time of the oldest (epoch seconds or None)."""
        query = select(func.count(), func.min(outbox_events.c.viewed_at_ms))
        async with self.engine.connect() as connection:
            waiting, oldest = (await connection.execute(query)).one()
        return {
            "outbox_events": int(waiting),
            "outbox_oldest": None if oldest is None else oldest / 1000,
            "outbox_in_memory": self.in_memory,
            "outbox_dropped": self.dropped,
        }


def _resolve(future: asyncio.Future[bool] | None, written: bool) -> None:
    if future is not None and not future.done():
        future.set_result(written)
