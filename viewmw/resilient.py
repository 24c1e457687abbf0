"""Redis outages: a circuit breaker in front of the tracker and database-only counting behind it.

While Redis answers, every call goes to :class:`~viewmw.tracker.ViewTracker`. When it fails, the
breaker opens and views are counted by :class:`~viewmw.fallback.DatabaseFallback` instead, with no
request waiting on Redis. When a probe succeeds, tracking returns to Redis; the fallback's buffer
is flushed and the cached database counts of the contents it touched are dropped from Redis, so
they are read again, once, with the fallback's views in them.

A request whose Redis call failed is answered without counting: the script may have run before
the failure, and counting it again would count it twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from viewmw.breaker import BreakerState, CircuitBreaker
from viewmw.fallback import DatabaseFallback
from viewmw.keys import validate_content_id, validate_content_type, validate_viewer
from viewmw.settings import Settings
from viewmw.tracker import BlockReason, TrackResult, ViewCount, ViewTracker

logger = logging.getLogger("viewmw")

# What a failing, slow or confused Redis raises through redis-py and the tracker.
REDIS_FAILURES = (RedisError, OSError, TimeoutError, ValueError, IndexError, TypeError)


class ResilientTracker:
    """:class:`ViewTracker`'s request-path API, kept working through Redis outages.

    Args:
        tracker: the Redis tracker.
        fallback: database-only counting while the breaker is open (``None``: no counting then,
            counts are left out).
        breaker: decides when Redis is skipped; a default one if not given.

    The tracker bounds each Redis call by ``redis_timeout`` (a timeout counts as a failure) and
    each database read by ``database_timeout`` (a slow database leaves the count out, but never
    opens the breaker).
    """

    def __init__(
        self,
        tracker: ViewTracker,
        fallback: DatabaseFallback | None = None,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.tracker = tracker
        self.fallback = fallback
        self.breaker = breaker or CircuitBreaker()
        self._reconciling: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        """The tracker's settings."""
        return self.tracker.settings

    async def track_view(
        self, content_type: str, content_id: str | int, viewer: str
    ) -> TrackResult:
        """Like :meth:`ViewTracker.track_view`, but a Redis failure never raises."""
        # Validated here too: a bad id is the caller's error (InvalidKeyError, a ValueError), and
        # must not be mistaken below for a confused Redis and count against the breaker.
        content_type = validate_content_type(content_type)
        content_id = validate_content_id(content_id)
        viewer = validate_viewer(viewer)
        if self.breaker.allow():
            try:
                result = await self.tracker.track_view(content_type, content_id, viewer)
            except REDIS_FAILURES as exc:
                self._failed(exc)
                return TrackResult(False, None, None)
            except asyncio.CancelledError:
                self._cancelled()
                raise
            self._succeeded()
            return result
        if self.fallback is None:
            return TrackResult(False, None, None)
        day = self.tracker.calendar_day_name()
        counted = await self.fallback.track_view(content_type, content_id, viewer, day)
        total = await self.fallback.count(content_type, content_id)
        return TrackResult(
            counted,
            None if counted else BlockReason.VIEWED_TODAY,
            None if total is None else ViewCount(total, 0, 0),
        )

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """Like :meth:`ViewTracker.get_view_count_details`; during an outage, from the database."""
        content_type = validate_content_type(content_type)
        ids = [validate_content_id(content_id) for content_id in content_ids]
        if self.breaker.allow():
            try:
                details = await self.tracker.get_view_count_details(content_type, ids)
            except REDIS_FAILURES as exc:
                self._failed(exc)
            except asyncio.CancelledError:
                self._cancelled()
                raise
            else:
                self._succeeded()
                return details
        result: dict[str, ViewCount | None] = {}
        for content_id in dict.fromkeys(ids):
            total = await self.fallback.count(content_type, content_id) if self.fallback else None
            result[content_id] = None if total is None else ViewCount(total, 0, 0)
        return result

    async def get_view_counts(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, int]:
        """Like :meth:`ViewTracker.get_view_counts`."""
        details = await self.get_view_count_details(content_type, content_ids)
        return {content_id: count.total for content_id, count in details.items() if count}

    async def get_view_count(self, content_type: str, content_id: str | int) -> int | None:
        """The combined count of one content, or ``None`` when it cannot be read now."""
        details = await self.get_view_count_details(content_type, [content_id])
        count = next(iter(details.values()))
        return None if count is None else count.total

    async def aclose(self) -> None:
        """Flush the fallback buffer (call on shutdown)."""
        if self._reconciling is not None:
            await asyncio.gather(self._reconciling, return_exceptions=True)
        if self.fallback is not None:
            await self.fallback.aclose()
            await self._forget_touched_counts()

    async def _forget_touched_counts(self) -> None:
        """At shutdown: drop the cached counts the fallback made stale, if Redis answers now.

        If it does not, those counts expire by their TTL instead."""
        assert self.fallback is not None
        touched = self.fallback.take_touched() if not self.fallback.buffered else set()
        if not touched:
            return
        try:
            async with asyncio.timeout(self.settings.redis_timeout):
                await self.tracker.invalidate_database_counts(touched)
        except Exception:
            logger.warning("%d cached counts stay stale until they expire", len(touched))

    # Breaker bookkeeping ------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        logger.debug("Redis call failed: %r", exc)
        self.breaker.failure()

    def _cancelled(self) -> None:
        # A cancelled probe must not leave the breaker waiting for its answer forever.
        if self.breaker.state is BreakerState.HALF_OPEN:
            self.breaker.failure()

    def _succeeded(self) -> None:
        self.breaker.success()
        fallback = self.fallback
        idle = self._reconciling is None or self._reconciling.done()
        if fallback is not None and (fallback.buffered or fallback.stats.touched) and idle:
            self._reconciling = asyncio.get_running_loop().create_task(self._reconcile())

    async def _reconcile(self) -> None:
        """After an outage: write the fallback's views, then drop the stale cached counts."""
        assert self.fallback is not None
        try:
            await self.fallback.flush()
            if self.fallback.buffered:
                return  # the database is still failing; the next success tries again
            touched = self.fallback.take_touched()
            try:
                await self.tracker.invalidate_database_counts(touched)
            except BaseException:
                self.fallback.stats.touched |= touched
                raise
            logger.warning("back on Redis after an outage: %d counts will be re-read", len(touched))
        except Exception:
            logger.exception("reconciling after a Redis outage failed; will retry")
