"""ViewTracker: record a view, read counts, report statistics.

A tracked view costs one Redis round trip (the ``record_view`` script) and no SQL while the
content's database count is cached in Redis. On a cache miss the count is read from the database
once and cached by a second script that refuses the value if a sync moved views meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from viewmw.errorlog import ErrorLog
from viewmw.errors import InvalidKeyError, ServiceUnavailableError
from viewmw.keys import KeySchema, validate_content_id, validate_content_type, validate_viewer
from viewmw.pipeline import AutoPipeline
from viewmw.scripts import Scripts
from viewmw.settings import Settings
from viewmw.store import Store

logger = logging.getLogger("viewmw")

# Tracking keys outlive the window they enforce by this much, so a slightly fast Redis clock
# never ends a window early; rules are decided on the caller's clock, not on TTLs.
_TTL_GRACE_SECONDS = 3600
# Cached database counts are read again from the database after this long, at the latest.
DATABASE_COUNT_TTL_SECONDS = 24 * 3600
# A cache fill that a sync overtook is retried this many times before the count is left out.
_FILL_ATTEMPTS = 3


class BlockReason(StrEnum):
    """Why a view was not counted, in the order the rules are checked."""

    COOLDOWN = "cooldown"
    VIEWED_TODAY = "viewed_today"
    SESSION_LIMIT = "session_limit"
    DAILY_LIMIT = "daily_limit"


_REASONS = {
    1: BlockReason.COOLDOWN,
    2: BlockReason.VIEWED_TODAY,
    3: BlockReason.SESSION_LIMIT,
    4: BlockReason.DAILY_LIMIT,
}


@dataclass(frozen=True, slots=True)
class ViewCount:
    """The parts of one content's count. ``total`` is what ``X-View-Count`` shows."""

    database: int
    pending: int
    syncing: int

    @property
    def total(self) -> int:
        """database + pending + syncing."""
        return self.database + self.pending + self.syncing


@dataclass(frozen=True, slots=True)
class TrackResult:
    """The outcome of :meth:`ViewTracker.track_view`.

    Attributes:
        counted: whether this view was counted.
        reason: the first rule that blocked it, or ``None`` when counted (or only read).
        count: the combined count after this view, or ``None`` when the database count could not
            be read (the view itself is still recorded).
    """

    counted: bool
    reason: BlockReason | None
    count: ViewCount | None


@dataclass(frozen=True, slots=True)
class _Day:
    """A calendar day in the configured zone: its name and its bounds in epoch seconds."""

    name: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _RawCounts:
    """What Redis holds for one content; ``database`` is ``None`` when not cached."""

    pending: int
    syncing: int
    database: int | None


class ViewTracker:
    """Records views under the abuse rules and reads combined counts.

    Args:
        redis: a ``redis.asyncio`` client (``decode_responses`` may be on or off).
        store: the database side; ``None`` treats every database count as 0 (Redis-only use).
        settings: limits, time zone and key prefix.
        clock: returns the current time in seconds since the epoch; inject one in tests.
        pipelining: send the script calls of concurrent requests to Redis together in shared
            pipelines (see :mod:`viewmw.pipeline`); off sends each call on its own.
    """

    def __init__(
        self,
        redis: Redis,
        store: Store | None = None,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        pipelining: bool = True,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings or Settings()
        self.keys = KeySchema(self.settings.key_prefix)
        self.clock = clock
        self.scripts = Scripts.register(redis)
        self._zone = self.settings.zone
        self._day: _Day | None = None
        self._database_errors = ErrorLog(
            what="reading database counts", consequence="those counts are left out"
        )
        self._pipeline = AutoPipeline(redis) if pipelining else None

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """One script call on the request path, bounded by ``redis_timeout``."""
        async with asyncio.timeout(self.settings.redis_timeout):
            if self._pipeline is None:
                return await script(keys=keys, args=args)
            return await self._pipeline.run(script, keys, args)

    # Recording ----------------------------------------------------------------------------------

    async def track_view(
        self, content_type: str, content_id: str | int, viewer: str
    ) -> TrackResult:
        """Offer one view to the abuse rules; count it if they all pass.

        Raises:
            InvalidKeyError: for a bad content type, id or viewer (before Redis is called).
            redis.RedisError: when Redis fails; a database failure only leaves ``count`` ``None``.
        """
        content_type = validate_content_type(content_type)
        content_id = validate_content_id(content_id)
        viewer = validate_viewer(viewer)
        if self.store is not None and not self.store.accepts_id(content_type, content_id):
            # Counted now, it could never reach its table: refuse it while the client is here.
            raise InvalidKeyError(f"no {content_type} row can have the id {content_id!r}")
        now = math.floor(self.clock())
        day = self._calendar_day(now)
        seconds_left_today = day.end - now
        limits = self.settings.limits
        session_ttl = max(
            limits.session_seconds, limits.view_cooldown_seconds or 0, seconds_left_today
        )
        keys = self.keys
        reply = await self._run(
            self.scripts.record_view,
            [
                keys.pending(content_type, content_id),
                keys.syncing(content_type, content_id),
                keys.database_count(content_type, content_id),
                keys.session(viewer, content_type, content_id),
                keys.daily_views(viewer, day.name),
                keys.dirty,
                keys.epoch,
                keys.sync_batch,
            ],
            [
                now,
                limits.max_views_per_session or 0,
                limits.session_seconds,
                limits.max_daily_views_per_user or 0,
                int(limits.one_view_per_day),
                limits.view_cooldown_seconds or 0,
                day.start,
                session_ttl + _TTL_GRACE_SECONDS,
                seconds_left_today + _TTL_GRACE_SECONDS,
                keys.member(content_type, content_id),
            ],
        )
        if not isinstance(reply, list) or len(reply) != 7 or reply[0] not in (0, 1):
            raise ValueError(f"unexpected reply from the record_view script: {reply!r:.80}")
        counted, reason_code = bool(reply[0]), int(reply[1])
        raw = _RawCounts(_count(reply[2]), _count(reply[3]), _cached(reply[4]))
        reason = _REASONS.get(reason_code)
        logger.debug(
            "view %s %s:%s by %s",
            "counted" if counted else f"blocked ({reason})",
            content_type,
            content_id,
            viewer,
        )
        count = await self._complete(
            content_type, {content_id: raw}, int(reply[5]), _text(reply[6])
        )
        return TrackResult(counted, reason, count[content_id])

    def _calendar_day(self, now: int) -> _Day:
        """The calendar day of ``now`` in the configured zone (computed once per day)."""
        day = self._day
        if day is None or not day.start <= now < day.end:
            local = datetime.fromtimestamp(now, self._zone).date()
            start = datetime.combine(local, datetime.min.time(), self._zone)
            end = datetime.combine(local + timedelta(days=1), datetime.min.time(), self._zone)
            day = self._day = _Day(local.isoformat(), int(start.timestamp()), int(end.timestamp()))
        return day

    # Reading ------------------------------------------------------------------------------------

    async def get_view_count(self, content_type: str, content_id: str | int) -> int:
        """The combined count (database + pending + syncing) of one content.

        Raises:
            ServiceUnavailableError: the database part cannot be read now.
        """
        counts = await self.get_view_counts(content_type, [content_id])
        if not counts:
            raise ServiceUnavailableError("the database count cannot be read right now")
        return next(iter(counts.values()))

    async def get_view_counts(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, int]:
        """Combined counts of many contents: one Redis round trip, plus SQL only for uncached ones.

        Returns a dict keyed by the ids as text, in the order given. A count whose database part
        cannot be read right now is left out.
        """
        detailed = await self.get_view_count_details(content_type, content_ids)
        return {content_id: count.total for content_id, count in detailed.items() if count}

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """Like :meth:`get_view_counts`, with the database, pending and syncing parts apart."""
        content_type = validate_content_type(content_type)
        if isinstance(content_ids, str | bytes):
            raise TypeError("content_ids must be a sequence of ids, not one id")
        ids = list(dict.fromkeys(validate_content_id(i) for i in content_ids))
        if not ids:
            return {}
        raw, epoch, batch_id = await self._read_raw(content_type, ids)
        return await self._complete(content_type, raw, epoch, batch_id)

    async def _read_raw(
        self, content_type: str, ids: list[str]
    ) -> tuple[dict[str, _RawCounts], int, str]:
        """What Redis holds for ``ids``, the sync epoch and the unsettled batch, in one call."""
        keys = self.keys
        per_content = self._parts_keys(content_type, ids)
        reply = await self._run(
            self.scripts.read_counts, [keys.epoch, keys.sync_batch, *per_content], []
        )
        if not isinstance(reply, list) or len(reply) != 2 + 3 * len(ids):
            raise ValueError(f"unexpected reply from the read_counts script: {reply!r:.80}")
        raw = {
            content_id: _RawCounts(
                _count(reply[2 + 3 * n]), _count(reply[3 + 3 * n]), _cached(reply[4 + 3 * n])
            )
            for n, content_id in enumerate(ids)
        }
        return raw, int(reply[0]), _text(reply[1])

    def _parts_keys(self, content_type: str, ids: list[str]) -> list[str]:
        """Pending, syncing and cached database count keys of each id, in that order."""
        keys = self.keys
        return [
            key
            for content_id in ids
            for key in (
                keys.pending(content_type, content_id),
                keys.syncing(content_type, content_id),
                keys.database_count(content_type, content_id),
            )
        ]

    async def get_redis_view_count(self, content_type: str, content_id: str | int) -> int:
        """Views in Redis not yet in the database (pending + syncing)."""
        content_type = validate_content_type(content_type)
        content_id = validate_content_id(content_id)
        raw, _, _ = await self._read_raw(content_type, [content_id])
        return raw[content_id].pending + raw[content_id].syncing

    async def get_database_view_count(self, content_type: str, content_id: str | int) -> int:
        """The count stored in the database, read with SQL (0 without a store)."""
        content_type = validate_content_type(content_type)
        content_id = validate_content_id(content_id)
        if self.store is None:
            return 0
        return await self.store.read_count(content_type, content_id)

    async def _complete(
        self, content_type: str, raw: dict[str, _RawCounts], epoch: int, batch_id: str
    ) -> dict[str, ViewCount | None]:
        """Fill in database counts missing from the Redis cache."""
        result: dict[str, ViewCount | None] = {
            content_id: ViewCount(parts.database, parts.pending, parts.syncing)
            if parts.database is not None
            else None
            for content_id, parts in raw.items()
        }
        missing = [content_id for content_id, count in result.items() if count is None]
        if not missing:
            return result
        if self.store is None:
            for content_id in missing:
                result[content_id] = ViewCount(0, raw[content_id].pending, raw[content_id].syncing)
            return result
        for _attempt in range(_FILL_ATTEMPTS):
            try:
                async with asyncio.timeout(self.settings.database_timeout):
                    filled = await self._fill_cache(content_type, missing, raw, epoch, batch_id)
            except Exception as exc:
                self._database_errors.report(exc)
                break
            result.update(filled)
            missing = [content_id for content_id in missing if content_id not in filled]
            if not missing:
                break
            # A sync moved views while the database was read: read Redis again and retry.
            raw, epoch, batch_id = await self._read_raw(content_type, missing)
            for content_id, parts in raw.items():
                if parts.database is not None:
                    result[content_id] = ViewCount(parts.database, parts.pending, parts.syncing)
            missing = [content_id for content_id in missing if result[content_id] is None]
            if not missing:
                break
        return result

    async def _fill_cache(
        self,
        content_type: str,
        missing: list[str],
        raw: dict[str, _RawCounts],
        epoch: int,
        batch_id: str,
    ) -> dict[str, ViewCount]:
        """Read missing database counts and cache them, unless a sync moved views meanwhile.

        The counts and the batch's ledger entry come from one database snapshot. If the unsettled
        batch is already committed, the database includes its views, which Redis still shows as
        syncing: they are subtracted so that the cache holds the database's count as of the last
        settle, which is what the settle step adds to.
        """
        assert self.store is not None
        counts, committed = await self.store.read_counts(content_type, missing, batch_id)
        bases = {
            content_id: max(0, counts[content_id] - (raw[content_id].syncing if committed else 0))
            for content_id in missing
        }
        keys = self.keys
        per_content = self._parts_keys(content_type, missing)
        reply = await self.scripts.fill_cache(
            keys=[keys.epoch, *per_content],
            args=[epoch, DATABASE_COUNT_TTL_SECONDS, *(bases[c] for c in missing)],
        )
        if not int(reply[0]):
            logger.debug("a sync moved views during a count read; %s not cached", content_type)
            return {}
        return {
            content_id: ViewCount(
                database=int(reply[3 + 3 * n]),
                pending=int(reply[1 + 3 * n]),
                syncing=int(reply[2 + 3 * n]),
            )
            for n, content_id in enumerate(missing)
        }

    async def invalidate_database_counts(self, contents: Iterable[tuple[str, str]]) -> None:
        """Drop cached database counts (after the database changed behind Redis' back).

        The epoch moves in the same transaction, so no cache fill that read the database before
        can store its older value afterwards.
        """
        keys = [self.keys.database_count(t, i) for t, i in contents]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(self.keys.epoch)
            for start in range(0, len(keys), 1000):
                pipe.delete(*keys[start : start + 1000])
            await pipe.execute()

    def calendar_day_name(self) -> str:
        """Today's date (``YYYY-MM-DD``) in the configured zone, by the tracker's clock."""
        return self._calendar_day(math.floor(self.clock())).name

    # Statistics ---------------------------------------------------------------------------------

    async def abuse_stats(self) -> dict[str, Any]:
        """The limits, how many tracking keys exist (counted with ``SCAN``, never ``KEYS``), and
        the last syncs from the ledger (``last_syncs``, newest first)."""
        limits = self.settings.limits
        keys = self.keys
        return {
            "max_views_per_session": limits.max_views_per_session,
            "session_seconds": limits.session_seconds,
            "max_daily_views_per_user": limits.max_daily_views_per_user,
            "one_view_per_day": limits.one_view_per_day,
            "view_cooldown_seconds": limits.view_cooldown_seconds,
            "timezone": self.settings.timezone,
            "pending_view_keys": await self._count_keys(keys.pending_pattern),
            "session_keys": await self._count_keys(keys.session_pattern),
            "daily_limit_keys": await self._count_keys(keys.daily_views_pattern),
            "dirty_contents": int(await self.redis.scard(keys.dirty))
            + int(await self.redis.scard(keys.draining)),
            "last_syncs": await self.store.last_batches(5) if self.store else [],
        }

    async def _count_keys(self, pattern: str) -> int:
        return sum([1 async for _ in self.redis.scan_iter(match=pattern, count=1000)])


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"unexpected count from Redis: {value!r:.80}")
    return value


def _cached(value: Any) -> int | None:
    if isinstance(value, int) and value == -1:
        return None
    return _count(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value or "")
