"""Database-only counting while Redis is out of reach.

Views are counted into an in-process buffer and flushed to the database in bulk every
``flush_seconds`` (0 writes each view through at once), through the same ledger as the sync: a
flush takes a batch id before its first attempt and keeps it across retries, so a flush whose
commit went through but whose answer was lost is never counted twice.

The abuse rules degrade to a best-effort check in this process: one counted view per viewer per
content per calendar day. Counts shown are the database count (cached briefly) plus what this
process has buffered. What a hard kill of the process can lose is exactly the buffer: at most
``flush_seconds`` of fallback views, and never more than ``max_buffered_views``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from viewmw.errorlog import ErrorLog
from viewmw.store import Store

logger = logging.getLogger("viewmw")

ContentKey = tuple[str, str]


@dataclass(slots=True)
class _PendingFlush:
    """A batch taken out of the buffer, with the id it keeps until it commits."""

    batch_id: str
    started_at: datetime
    deltas: dict[ContentKey, int]


@dataclass(slots=True)
class FallbackStats:
    """What the fallback did since the process started."""

    counted: int = 0
    blocked: int = 0
    dropped: int = 0
    flushed_views: int = 0
    flush_failures: int = 0
    touched: set[ContentKey] = field(default_factory=set)


class DatabaseFallback:
    """Counts views into the database, through a bounded in-process buffer.

    Args:
        store: the database side.
        flush_seconds: how often the buffer is written (0 = every view at once).
        max_buffered_views: views held at most; more are dropped, counted and logged.
        max_viewers_remembered: size of the per-day "already counted" memory.
        count_cache_seconds: how long a database count read for display is reused.
        clock: seconds since the epoch.
    """

    def __init__(
        self,
        store: Store,
        *,
        flush_seconds: float = 2.0,
        max_buffered_views: int = 100_000,
        max_viewers_remembered: int = 1_000_000,
        count_cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_seconds < 0 or max_buffered_views < 1 or max_viewers_remembered < 1:
            raise ValueError("flush_seconds >= 0, max_buffered_views >= 1, max_viewers >= 1")
        self.store = store
        self.flush_seconds = flush_seconds
        self.max_buffered_views = max_buffered_views
        self.max_viewers_remembered = max_viewers_remembered
        self.count_cache_seconds = count_cache_seconds
        self.clock = clock
        self.stats = FallbackStats()
        self._buffer: dict[ContentKey, int] = {}
        self._unflushed: list[_PendingFlush] = []
        self._seen: set[tuple[str, str, str]] = set()
        self._seen_day = ""
        self._counts: dict[ContentKey, tuple[float, int]] = {}
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._dropped_logged_at = 0.0
        self._flush_errors = ErrorLog(
            what="writing fallback views", consequence="they stay buffered for the next flush"
        )

    @property
    def buffered(self) -> int:
        """Views counted in this process and not yet committed to the database."""
        in_flight = sum(sum(batch.deltas.values()) for batch in self._unflushed)
        return sum(self._buffer.values()) + in_flight

    def buffered_for(self, key: ContentKey) -> int:
        """Views of one content counted here and not yet committed."""
        return self._buffer.get(key, 0) + sum(batch.deltas.get(key, 0) for batch in self._unflushed)

    async def track_view(self, content_type: str, content_id: str, viewer: str, day: str) -> bool:
        """Count the view unless this process already counted this viewer for this content today.

        Returns whether it counted. Never raises for a database failure: the view stays buffered.
        """
        if day != self._seen_day:
            self._seen, self._seen_day = set(), day
        seen_key = (viewer, content_type, content_id)
        if seen_key in self._seen:
            self.stats.blocked += 1
            return False
        if self.buffered >= self.max_buffered_views:
            self._drop()
            return False
        if len(self._seen) < self.max_viewers_remembered:
            self._seen.add(seen_key)
        key = (content_type, content_id)
        self._buffer[key] = self._buffer.get(key, 0) + 1
        self.stats.counted += 1
        self.stats.touched.add(key)
        if self.flush_seconds == 0:
            await self.flush()
        else:
            self._ensure_flusher()
        return True

    async def count(self, content_type: str, content_id: str) -> int | None:
        """Database count (cached for ``count_cache_seconds``) plus this process's buffer, or
        ``None`` when the database cannot be read and nothing is cached."""
        key = (content_type, content_id)
        now = self.clock()
        cached = self._counts.get(key)
        if cached is None or now - cached[0] > self.count_cache_seconds:
            try:
                value = await self.store.read_count(content_type, content_id)
            except Exception:
                logger.debug("database count read failed during a Redis outage", exc_info=True)
                return None if cached is None else cached[1] + self.buffered_for(key)
            self._counts[key] = (now, value)
            cached = self._counts[key]
        return cached[1] + self.buffered_for(key)

    async def flush(self) -> int:
        """Commit everything buffered; returns the views committed. Failures keep the views
        (same batch id) for the next attempt."""
        async with self._flush_lock:
            if self._buffer:
                self._unflushed.append(
                    _PendingFlush(uuid.uuid4().hex, datetime.now(UTC), self._buffer)
                )
                self._buffer = {}
            committed = 0
            while self._unflushed:
                batch = self._unflushed[0]
                try:
                    await self.store.commit_batch(batch.batch_id, batch.started_at, batch.deltas)
                except Exception as exc:
                    self.stats.flush_failures += 1
                    self._flush_errors.report(exc)
                    return committed
                self._unflushed.pop(0)
                views = sum(batch.deltas.values())
                committed += views
                self.stats.flushed_views += views
                for key in batch.deltas:
                    # The database has these views now: re-read rather than show them twice.
                    self._counts.pop(key, None)
            return committed

    def take_touched(self) -> set[ContentKey]:
        """Contents whose database count the fallback changed (cleared by the call)."""
        touched, self.stats.touched = self.stats.touched, set()
        return touched

    async def aclose(self) -> None:
        """Stop the periodic flush and flush what is left (call on shutdown)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while self._buffer or self._unflushed:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    def _drop(self) -> None:
        self.stats.dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= 60:
            self._dropped_logged_at = now
            logger.error(
                "fallback buffer full (%d views): %d views dropped so far",
                self.max_buffered_views,
                self.stats.dropped,
            )
