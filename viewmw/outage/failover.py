"""ResilientTracker: the request path of :class:`~viewmw.tracker.ViewTracker`, kept working
through Redis outages without ever counting a view on two paths.

- Redis answers: the view is decided by the recording script, as always.
- Redis' reply is late (our deadline passed; maybe only our event loop was busy): the request is
  answered without a count, and that view is left to the script Redis runs. A probe timed off
  the event loop (:mod:`~viewmw.outage.probe`) decides whether Redis itself is slow; only then
  does the breaker open.
- Redis fails (refused, reset, closed, a reply that does not parse) and the breaker opens: each
  view offered meanwhile is written to the database outbox, and replayed through the same script
  with its original time once Redis answers again (:mod:`~viewmw.outage.replayer`). The count
  shown meanwhile is the database count plus the content's events waiting in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from viewmw.contract import TrackResult, ViewCount
from viewmw.errorlog import ErrorLog
from viewmw.failures import FailureKind, NodeDownError, classify, never_ran
from viewmw.keys import validate_content_id, validate_content_type, validate_viewer
from viewmw.metrics.recording import recorder
from viewmw.outage.breaker import BreakerState, CircuitBreaker
from viewmw.outage.outbox import Outbox, OutboxEvent
from viewmw.outage.probe import RedisProbe
from viewmw.outage.replayer import Replayer
from viewmw.settings import Settings
from viewmw.tracker import ViewTracker

logger = logging.getLogger("viewmw")

_UNKNOWN = TrackResult(False, None, None)


@dataclass(slots=True)
class _OutageCount:
    """A content's outage count as read from the database, and this process's events since."""

    read_at: float
    value: int
    added_at_read: int


class ResilientTracker:
    """:class:`ViewTracker`'s request-path API, exact through late replies and Redis outages.

    Args:
        tracker: the Redis tracker.
        outbox: where views go while Redis is unreachable (``None``: they are not counted).
        breaker: decides when Redis is skipped; a default one if not given.
        probe: tells a slow Redis from a busy loop; by default one for the tracker's Redis URL.
        count_cache_seconds: how long an outage count read from the database is reused (this
            process's own outbox events are added on top at once).
    """

    def __init__(
        self,
        tracker: ViewTracker,
        outbox: Outbox | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        probe: RedisProbe | None = None,
        count_cache_seconds: float = 1.0,
    ) -> None:
        self.tracker = tracker
        self.outbox = outbox
        self.breaker = breaker or CircuitBreaker()
        settings = tracker.settings
        self.probe = probe or RedisProbe(settings.redis_url, settings.redis_probe_timeout)
        self.count_cache_seconds = count_cache_seconds
        self.replayer = Replayer(tracker, outbox) if outbox is not None else None
        self._outage_counts: dict[tuple[str, str], _OutageCount] = {}
        self._added: dict[tuple[str, str], int] = {}
        self._backlog = outbox is not None  # the outbox may hold events from an earlier run
        self._next_replay_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeping: set[asyncio.Task[None]] = set()  # deferred views on their way to the outbox
        self._closed = False
        self._replaying: asyncio.Task[None] | None = None
        # One log per consequence: a line names what failed and what it cost.
        self._count_errors = ErrorLog(
            what="reading a count from the database during a Redis outage"
        )
        self._deferred_errors = ErrorLog(
            what="a deferred view", consequence="its outcome is unknown"
        )
        self._keep_errors = ErrorLog(
            what="keeping a deferred view in the outbox", consequence="that view is not counted"
        )
        self._replay_errors = ErrorLog(
            what="replaying the outbox",
            consequence="its views wait there for the next replay",
        )
        self.late_replies = 0
        self.metrics = recorder()

    @property
    def settings(self) -> Settings:
        """The tracker's settings."""
        return self.tracker.settings

    @property
    def clock(self) -> Callable[[], float]:
        """The tracker's clock."""
        return self.tracker.clock

    # Recording ----------------------------------------------------------------------------------

    async def track_view(
        self, content_type: str, content_id: str | int, viewer: str
    ) -> TrackResult:
        """Like :meth:`ViewTracker.track_view`, but a Redis failure or a late reply never raises.

        Raises:
            InvalidKeyError: for a bad content type, id or viewer.
        """
        # Validated here, before any failure handling: a caller's bad id must not be mistaken
        # for a confused Redis and count against the breaker.
        return await self.track_valid_view(
            validate_content_type(content_type),
            validate_content_id(content_id),
            validate_viewer(viewer),
        )

    async def track_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> TrackResult:
        """:meth:`track_view` for names the caller has validated already (no second check)."""
        if not self.breaker.allow():
            return await self._queue(content_type, content_id, viewer)
        # A call Redis refused before running it leaves its view to the outbox, as with the
        # breaker open, at the time it was offered: nothing can count it twice.
        at = self.tracker.clock()
        return await self._through_breaker(
            self.tracker.track_valid_view(content_type, content_id, viewer),
            if_never_ran=lambda: self._queue(content_type, content_id, viewer, at),
        )

    async def track_valid_crawler_view(self, content_type: str, content_id: str) -> TrackResult:
        """Like :meth:`ViewTracker.track_valid_crawler_view`; while Redis is failing the
        crawler view is not kept (only people's views go to the outbox) and the count is read
        as :meth:`get_view_count_details` reads it."""
        if self.breaker.allow():
            return await self._through_breaker(
                self.tracker.track_valid_crawler_view(content_type, content_id)
            )
        counts = await self._outage_view_counts(content_type, [content_id])
        return TrackResult(False, None, counts[content_id])

    async def _through_breaker(
        self,
        call: Awaitable[TrackResult],
        *,
        if_never_ran: Callable[[], Awaitable[TrackResult]] | None = None,
    ) -> TrackResult:
        """Await a call the breaker let through, and tell the breaker how it ended; the outcome
        of ``if_never_ran`` instead when Redis failed in a way that proves the call never ran."""
        try:
            result = await call
        except asyncio.CancelledError:
            self._cancelled()
            raise
        except Exception as exc:
            kind = self._redis_failed(exc)
            if if_never_ran is not None and kind is FailureKind.REDIS and never_ran(exc):
                return await if_never_ran()
            return _UNKNOWN
        self._succeeded()
        return result

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        """Offer a view without waiting for it (the deferred mode), or return ``None`` without
        offering it (see :meth:`ViewTracker.offer_valid_view`; also while Redis is failing, so
        that the outage path is the default mode's)."""
        if not self.breaker.is_closed:
            return None
        known = self.tracker.known_count(content_type, content_id)
        if known is None or self.tracker.backlogged:
            return None
        at = self.tracker.clock()
        future = self.tracker.submit_valid_view(content_type, content_id, viewer)
        view = (content_type, content_id, viewer, at)
        future.add_done_callback(functools.partial(self._offered, view))
        return known

    def _offered(self, view: tuple[str, str, str, float], future: asyncio.Future[Any]) -> None:
        """The outcome of a deferred view: the breaker learns from it as from any other, and a
        view whose call never ran goes to the outbox."""
        if future.cancelled():
            return
        if (exc := future.exception()) is None:
            self._succeeded()
        elif classify(exc) in (FailureKind.LATE, FailureKind.REDIS):
            if self._redis_failed(exc) is FailureKind.REDIS and never_ran(exc):
                if self._closed:
                    logger.error("a deferred view was refused by Redis after shutdown: not kept")
                    return
                task = asyncio.get_running_loop().create_task(self._keep(*view))
                self._keeping.add(task)
                task.add_done_callback(self._keeping.discard)
        else:
            self._deferred_errors.report(exc)

    async def _keep(self, content_type: str, content_id: str, viewer: str, at: float) -> None:
        """:meth:`_queue` for a view nobody waits for (the deferred mode)."""
        try:
            await self._queue(content_type, content_id, viewer, at)
        except Exception as exc:
            self._keep_errors.report(exc)

    async def _queue(
        self, content_type: str, content_id: str, viewer: str, at: float | None = None
    ) -> TrackResult:
        """Redis is unreachable: keep the view (offered at ``at``, by default now) in the
        outbox; show database + outbox."""
        if self.outbox is None:
            return _UNKNOWN
        self.tracker.refuse_impossible_id(content_type, content_id)  # as Redis' path would
        when = self.tracker.clock() if at is None else at
        event = OutboxEvent.new(content_type, content_id, viewer, when)
        key = (content_type, content_id)
        self._added[key] = self._added.get(key, 0) + 1
        self.metrics.view_queued()
        self._backlog = True
        queued = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.database_request_timeout):
                queued = await self.outbox.add(event)
        counts = await self._outage_view_counts(content_type, [content_id])
        return TrackResult(False, None, counts[content_id], queued=queued)

    # Reading ------------------------------------------------------------------------------------

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """Like :meth:`ViewTracker.get_view_count_details`; during an outage, database + outbox.

        A count that cannot be read now (a late reply, a slow database) is ``None``.
        """
        content_type = validate_content_type(content_type)
        ids = list(dict.fromkeys(validate_content_id(content_id) for content_id in content_ids))
        if self.breaker.allow():
            try:
                details = await self.tracker.get_view_count_details(content_type, ids)
            except asyncio.CancelledError:
                self._cancelled()
                raise
            except Exception as exc:
                if self._redis_failed(exc) is FailureKind.LATE:
                    return dict.fromkeys(ids)
            else:
                self._succeeded()
                return details
        return await self._outage_view_counts(content_type, ids)

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

    async def _outage_view_counts(
        self, content_type: str, ids: list[str]
    ) -> dict[str, ViewCount | None]:
        """Database count + events waiting in the outbox, read under the request deadline."""
        result: dict[str, ViewCount | None] = dict.fromkeys(ids)
        store, outbox = self.tracker.store, self.outbox
        if store is None or outbox is None:
            return result
        now = time.monotonic()
        stale = [
            content_id
            for content_id in ids
            if (cached := self._outage_counts.get((content_type, content_id))) is None
            or now - cached.read_at > self.count_cache_seconds
        ]
        database = self.tracker.database_breaker
        if stale and database.allow():
            added = {c: self._added.get((content_type, c), 0) for c in stale}
            try:
                async with asyncio.timeout(self.settings.database_request_timeout):
                    counts, _ = await store.read_counts(content_type, stale)
                    waiting = await outbox.counts(content_type, stale)
            except Exception as exc:
                if isinstance(exc, TimeoutError):
                    database.inconclusive()  # our deadline, not the database's failure
                else:
                    database.failure()
                self._count_errors.report(exc)
            else:
                database.success()
                for content_id in stale:
                    # Events still in this process's memory are not in the table yet.
                    value = counts[content_id] + waiting[content_id]
                    value += outbox.in_memory_for(content_type, content_id)
                    self._outage_counts[(content_type, content_id)] = _OutageCount(
                        now, value, added[content_id]
                    )
        for content_id in ids:
            cached = self._outage_counts.get((content_type, content_id))
            if cached is not None:
                since = self._added.get((content_type, content_id), 0) - cached.added_at_read
                result[content_id] = ViewCount(cached.value + since, 0, 0)
        return result

    # Breaker bookkeeping ------------------------------------------------------------------------

    def _redis_failed(self, exc: BaseException) -> FailureKind:
        """Classify a failed Redis call; only what Redis says counts against the breaker."""
        kind = classify(exc)
        self.metrics.redis_failed(kind)
        if kind is FailureKind.LATE:
            self.late_replies += 1
            self._spawn(self._check_redis())
        elif isinstance(exc, NodeDownError):
            # One primary of a cluster is failing, and its own breaker keeps its calls back: the
            # other primaries still answer, so this is no failure of Redis as a whole.
            self.breaker.inconclusive()
        elif kind is FailureKind.REDIS:
            logger.debug("Redis call failed: %r", exc)
            self.breaker.failure()
        else:
            self._release_probe()
            raise exc
        return kind

    async def _check_redis(self) -> None:
        """A reply was late: ask the off-loop probe whether Redis itself is slow."""
        healthy = await self.probe.healthy()
        if not healthy:
            self.breaker.trip()
        elif self.breaker.state is BreakerState.HALF_OPEN:
            self._succeeded()

    def _cancelled(self) -> None:
        # A cancelled probe must not leave the breaker waiting for its answer forever.
        self._release_probe()

    def _release_probe(self) -> None:
        # Neither a cancelled request nor a caller's bad id says anything about Redis: another
        # request may probe it.
        self.breaker.inconclusive()

    def _succeeded(self) -> None:
        self.breaker.success()
        if self._backlog and self.replayer is not None:
            self.replay_soon()

    # Replay -------------------------------------------------------------------------------------

    def replay_soon(self) -> None:
        """Start replaying the outbox in the background, unless a replay runs or ran just now."""
        now = time.monotonic()
        running = self._replaying is not None and not self._replaying.done()
        if self.replayer is None or running or now < self._next_replay_at:
            return
        self._next_replay_at = now + 1.0
        self._replaying = self._spawn(self._replay())

    async def _replay(self) -> None:
        assert self.replayer is not None and self.outbox is not None
        try:
            if not await self.outbox.write_unwritten():
                return  # the database still refuses them; the next success tries again
            await self.replayer.replay()
        except Exception as exc:
            self._replay_errors.report(exc)
            return
        self._backlog = bool(self.outbox.in_memory)
        self._outage_counts.clear()

    def _spawn(self, coroutine: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Lifecycle ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Replay what an earlier run left in the outbox (in the background)."""
        if self.replayer is not None:
            self.replay_soon()

    async def drain(self) -> None:
        """Wait for the background work started so far: late calls, probes, a replay."""
        await self.tracker.drain()
        await asyncio.sleep(0)  # the done callbacks of the calls just answered start their tasks
        while self._tasks or self._keeping:
            await asyncio.gather(*self._keeping, return_exceptions=True)
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop background work and write the outbox events still in memory (on shutdown)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.redis_probe_timeout):
                await self.tracker.drain()  # late calls still decide their views
        await asyncio.sleep(0)  # the done callbacks of the calls just answered run first
        self._closed = True
        # Deferred views refused by Redis reach the outbox before it writes what it holds.
        await asyncio.gather(*self._keeping, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.outbox is not None:
            await self.outbox.aclose(self.settings.database_timeout)
        self.probe.close()
