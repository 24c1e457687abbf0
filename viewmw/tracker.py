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
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from viewmw.calendar_day import CalendarDay, calendar_day
from viewmw.contract import BlockReason, TrackResult, ViewCount
from viewmw.errorlog import ErrorLog
from viewmw.errors import InvalidKeyError, MalformedReplyError, ServiceUnavailableError
from viewmw.keys import KeySchema, validate_content_id, validate_content_type, validate_viewer
from viewmw.metrics.recording import recorder
from viewmw.node_connections import NodeConnections
from viewmw.outage.breaker import CircuitBreaker
from viewmw.pipeline import Batcher, Early, LateReply, ScriptCall, script_pipeline
from viewmw.script_connection import ScriptConnection
from viewmw.scripts import ScriptRunner, Scripts, run_on_client
from viewmw.settings import Settings
from viewmw.sharded_recording import ShardedRecording, ViewCall
from viewmw.store import Store

if TYPE_CHECKING:
    from viewmw.outage.outbox import OutboxEvent

logger = logging.getLogger("viewmw")

# Tracking keys outlive the window they enforce by this much, so a slightly fast Redis clock
# never ends a window early; rules are decided on the caller's clock, not on TTLs.
_TTL_GRACE_SECONDS = 3600
# Cached database counts are read again from the database after this long, at the latest.
DATABASE_COUNT_TTL_SECONDS = 24 * 3600
# A replayed outage event is remembered this long, so a replay killed before it deleted the event
# from the outbox cannot count it again when it runs again.
REPLAY_MARKER_TTL_SECONDS = 7 * 24 * 3600
# Contents whose latest count this process remembers for the deferred mode.
KNOWN_COUNTS = 100_000
# Contents whose Redis keys this process keeps built (about 1 kB each).
CONTENT_KEYS = 4096
# A cache fill that a sync overtook is retried this many times before the count is left out.
_FILL_ATTEMPTS = 3
# Database reads for the count cache that may outlive the request that started them: a read
# (or a connection being opened) slower than the request's deadline goes on and fills the cache
# for later requests, instead of being cancelled and started again by every request. At most this
# many at once, so a slow database never holds more of the pool than that.
MAX_FILLS_IN_FLIGHT = 4


# The reason codes of the ``record_views`` reply.
_REASONS = {
    1: BlockReason.COOLDOWN,
    2: BlockReason.VIEWED_TODAY,
    3: BlockReason.SESSION_LIMIT,
    4: BlockReason.DAILY_LIMIT,
}
_REASON_CODES = frozenset({0, *_REASONS})


_ViewReply = tuple[int, int, int, int, int | None, int, str]
"""counted (1, 0, or -1: replayed before), reason code, pending, syncing, cached database count
(``None`` when not cached), sync epoch, unsettled batch id."""


def _limit_args(settings: Settings) -> tuple[Any, ...]:
    """The arguments every ``record_views`` call shares: the limits, the replay marker TTL and
    whether unique viewers are counted."""
    limits = settings.limits
    return (
        limits.max_views_per_session or 0,
        limits.session_seconds,
        limits.max_daily_views_per_user or 0,
        int(limits.one_view_per_day),
        limits.view_cooldown_seconds or 0,
        REPLAY_MARKER_TTL_SECONDS,
        int(settings.unique_viewers),
    )


def _view_replies(reply: Any, views: int) -> list[_ViewReply]:
    """Split a ``record_views`` reply into one reply per view, checking every value."""
    if not isinstance(reply, list) or len(reply) != 2 + 5 * views:
        raise MalformedReplyError(f"unexpected reply from record_views: {reply!r:.80}")
    epoch, batch_id = _count(reply[0]), _text(reply[1])
    replies: list[_ViewReply] = []
    for n in range(2, len(reply), 5):
        counted, reason, pending, syncing, cached = reply[n : n + 5]
        if counted not in (-1, 0, 1) or reason not in _REASON_CODES:
            raise MalformedReplyError(f"unexpected reply from record_views: {reply!r:.80}")
        replies.append(
            (counted, reason, _count(pending), _count(syncing), _cached(cached), epoch, batch_id)
        )
    return replies


@dataclass(frozen=True, slots=True)
class _RawCounts:
    """What Redis holds for one content; ``database`` is ``None`` when not cached."""

    pending: int
    syncing: int
    database: int | None


@dataclass(frozen=True, slots=True)
class _ShardRead:
    """What one ``read_counts`` call found in one content shard (all of a single Redis):
    per id its parts, and the shard's sync epoch and unsettled batch."""

    keys: KeySchema
    raw: dict[str, _RawCounts]
    epoch: int
    batch_id: str

    def only(self, ids: Sequence[str]) -> _ShardRead:
        """The same read, for ``ids`` of it only."""
        return _ShardRead(self.keys, {i: self.raw[i] for i in ids}, self.epoch, self.batch_id)


class ViewTracker:
    """Records views under the abuse rules and reads combined counts.

    Args:
        redis: a ``redis.asyncio`` client (``decode_responses`` may be on or off); a
            ``RedisCluster`` one when ``settings`` name a cluster.
        store: the database side; ``None`` treats every database count as 0 (Redis-only use).
        settings: limits, time zone and key prefix.
        clock: returns the current time in seconds since the epoch; inject one in tests.
        pipelining: send the script calls of concurrent requests to Redis together in shared
            pipelines (see :mod:`viewmw.pipeline`); off sends each call on its own.
        script_connection: a dedicated connection to the same Redis that carries the
            ``record_views`` calls (see :mod:`viewmw.script_connection`); on a cluster, one per
            primary (:class:`~viewmw.node_connections.NodeConnections`, which carries the
            daily quota's calls too); ``None`` sends them through ``redis``. The caller owns it
            and closes it.

    With a ``redis+cluster://`` URL in ``settings``, ``redis`` is a ``RedisCluster`` client: the
    keys are spread over content shards, each batch of views is decided by one call per shard
    (see :mod:`viewmw.sharded_recording`), and counts are read per shard.
    """

    def __init__(
        self,
        redis: Redis,
        store: Store | None = None,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        pipelining: bool = True,
        script_connection: ScriptConnection | NodeConnections | None = None,
    ) -> None:
        self.redis = redis
        self.script_connection = script_connection
        self.store = store
        self.settings = settings or Settings()
        self.shards = self.settings.content_shards()
        # A single Redis' keys (on a cluster: shard 0's, for what has no content).
        self.keys = self.shards.schemas[0]
        self._clustered = self.shards.clustered
        self.clock = clock
        self.scripts = Scripts.register(redis)
        self._zone = self.settings.zone
        self._day: CalendarDay | None = None
        self._database_errors = ErrorLog(
            what="reading database counts", consequence="those counts are left out"
        )
        self.database_breaker = CircuitBreaker(
            subject="the database (count reads on the request path)",
            fallback="counts not cached in Redis are left out",
            name="database",
        )
        self.metrics = recorder()
        deadline = self.settings.redis_timeout
        self._views: Batcher[ViewCall, _ViewReply] | None = None
        self._reads: Batcher[ScriptCall, Any] | None = None
        if pipelining:
            self._views = Batcher(self._send_views, deadline=deadline)
            if not self._clustered:  # a cluster pipeline refuses EVALSHA
                self._reads = Batcher(script_pipeline(redis), deadline=deadline)
        self._limit_args = _limit_args(self.settings)
        self._sharded: ShardedRecording | None = None
        if self._clustered:
            if isinstance(script_connection, ScriptConnection):
                raise ValueError("a script connection reaches one Redis, not a cluster")
            self._sharded = ShardedRecording(
                redis,
                self.scripts,
                self.shards,
                self._limit_args,
                self.settings.limits.max_daily_views_per_user or None,
                script_connection.run_script if script_connection else run_on_client,
            )
        elif isinstance(script_connection, NodeConnections):
            raise ValueError("a cluster's node connections need a redis+cluster:// URL")
        # Count reads on a cluster take the node connections too, when there are some.
        self._send_read: ScriptRunner = (
            script_connection.run_script
            if self._clustered and script_connection is not None
            else run_on_client
        )
        self._known_counts: dict[str, int] = {}
        # "type:id" -> (day, the content's keys for that day), see _remember_content_keys.
        self._content_keys: dict[str, tuple[str, ...]] = {}
        self._fills: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._fill_tasks: set[asyncio.Task[dict[str, ViewCount]]] = set()
        self._sends: set[asyncio.Future[list[_ViewReply]]] = set()
        limits = self.settings.limits
        self._session_seconds = max(limits.session_seconds, limits.view_cooldown_seconds or 0)
        self._day_keys_seconds = self.settings.history_retention_days * 86400

    async def drain(self) -> None:
        """Wait until the Redis calls of requests that stopped waiting (late replies) are done,
        and the database reads that went on filling the count cache after their request's
        deadline (each bounded by ``database_timeout``)."""
        for batcher in (self._views, self._reads):
            if batcher is not None:
                await batcher.drain()
        while self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._sharded is not None:
            await self._sharded.drain()
        while self._fill_tasks:
            await asyncio.gather(*self._fill_tasks, return_exceptions=True)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """One read script call on the request path; late after ``redis_timeout``."""
        if self._reads is not None:
            return await self._reads.submit((script, keys, args))
        try:
            async with asyncio.timeout(self.settings.redis_timeout):
                return await self._send_read(script, keys, args)
        except TimeoutError:
            raise LateReply from None

    # Recording ----------------------------------------------------------------------------------

    async def track_view(
        self, content_type: str, content_id: str | int, viewer: str
    ) -> TrackResult:
        """Offer one view to the abuse rules; count it if they all pass.

        Raises:
            InvalidKeyError: for a bad content type, id or viewer (before Redis is called).
            LateReply: Redis' reply did not come within ``redis_timeout``; the view is still
                decided by the script Redis runs.
            redis.RedisError, MalformedReplyError: when Redis fails; a database failure only
                leaves ``count`` ``None``.
        """
        return await self.track_valid_view(
            validate_content_type(content_type),
            validate_content_id(content_id),
            validate_viewer(viewer),
        )

    async def track_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> TrackResult:
        """:meth:`track_view` for names the caller has validated already (no second check)."""
        self.refuse_impossible_id(content_type, content_id)
        call = self._view_call(content_type, content_id, viewer, self.clock())
        return await self._decide(content_type, content_id, call)

    async def _decide(self, content_type: str, content_id: str, call: ViewCall) -> TrackResult:
        """Send one view of a content with the current batch (or alone); its outcome."""
        if self._views is not None:
            reply = await self._views.submit(call)
        else:
            # Shielded: a request that stops waiting leaves its view to be decided whole (on a
            # cluster, its daily place reserved and maybe given back) rather than cut between
            # two calls; drain() waits for it.
            send = asyncio.ensure_future(self._send_views([call]))
            self._sends.add(send)
            send.add_done_callback(self._sent)
            try:
                async with asyncio.timeout(self.settings.redis_timeout):
                    (reply,) = await asyncio.shield(send)
            except TimeoutError:
                raise LateReply from None
            if isinstance(reply, BaseException):  # its shard failed (a cluster)
                raise reply
        return await self._result(content_type, content_id, reply)

    def _sent(self, send: asyncio.Future[list[_ViewReply]]) -> None:
        """A view sent alone has been decided: forget it, and retrieve an error nobody awaited
        (its request stopped waiting)."""
        self._sends.discard(send)
        _consume(send)

    async def _result(self, content_type: str, content_id: str, reply: _ViewReply) -> TrackResult:
        """A view's outcome from its reply, its count completed from the database if needed."""
        counted, reason_code, pending, syncing, cached, epoch, batch_id = reply
        reason = _REASONS.get(reason_code)
        if cached is not None:
            return TrackResult(counted == 1, reason, ViewCount(cached, pending, syncing))
        keys = self.shards.of(content_type, content_id)
        raw = {content_id: _RawCounts(pending, syncing, None)}
        count = await self._complete(content_type, [_ShardRead(keys, raw, epoch, batch_id)])
        return TrackResult(counted == 1, reason, count[content_id])

    def refuse_impossible_id(self, content_type: str, content_id: str) -> None:
        """Raise :class:`InvalidKeyError` for an id the content's table cannot hold (too large
        for its integer key, not a UUID, …): counted now, it could never reach its row. No SQL."""
        if self.store is not None and not self.store.accepts_id(content_type, content_id):
            raise InvalidKeyError(f"no {content_type} row can have the id {content_id!r}")

    def submit_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> asyncio.Future[_ViewReply]:
        """Queue one view (validated names) for the next batch without waiting for it; the
        future resolves to its reply. Needs pipelining."""
        if self._views is None:
            raise RuntimeError("offering views without waiting needs pipelining=True")
        self.refuse_impossible_id(content_type, content_id)
        return self._views.submit(self._view_call(content_type, content_id, viewer, self.clock()))

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        """Queue one view without waiting for it (the deferred mode) and return the latest count
        this process knows for the content.

        Returns ``None`` without queueing the view when it cannot be answered without waiting:
        the content's count is not known yet, or views are queueing faster than Redis takes them
        (so a crash could lose more than a moment's views). The caller then offers it with
        :meth:`track_valid_view`.
        """
        known = self.known_count(content_type, content_id)
        if known is None or self._views is None or self._views.backlogged:
            return None
        self.submit_valid_view(content_type, content_id, viewer).add_done_callback(_consume)
        return known

    @property
    def backlogged(self) -> bool:
        """Whether views are queueing faster than Redis takes them."""
        return self._views is not None and self._views.backlogged

    def known_count(self, content_type: str, content_id: str) -> int | None:
        """The combined count of a content as of the last reply this process got for it."""
        return self._known_counts.get(f"{content_type}:{content_id}")

    def _view_call(
        self,
        content_type: str,
        content_id: str,
        viewer: str,
        at: float,
        replay_marker: str | None = None,
        *,
        crawler: bool = False,
    ) -> ViewCall:
        """One view's part of a ``record_views`` call, for a view offered at ``at`` (validated
        names). A replayed view also passes its marker, which makes its decision idempotent.
        A crawler view is only counted apart, per day; it passes no viewer."""
        now = math.floor(at)
        day = self._calendar_day(now)
        keys = self.shards.of(content_type, content_id) if self._clustered else self.keys
        member = f"{content_type}:{content_id}"
        content_keys = self._content_keys.get(member)
        if content_keys is None or content_keys[0] != day.name:
            content_keys = self._remember_content_keys(member, content_type, content_id, day.name)
        _, pending, syncing, database_count, days, uniques, ranking, blocked = content_keys
        return (
            (
                pending,
                syncing,
                database_count,
                days if crawler else keys.sessions(viewer),
                # On a cluster the daily counter is in the viewer's slot: the view comes with a
                # reservation's answer instead (viewmw.sharded_recording), and this place holds
                # a key of its own slot that the script never touches.
                days if crawler or self._clustered else keys.daily_views(viewer, day.name),
                days,
                uniques,
                ranking,
                blocked,
                # The per-pair session of 0.1: read until the last of them has expired.
                days if crawler else keys.pair_session(viewer, content_type, content_id),
            ),
            (
                now,
                day.start,
                day.end,
                max(self._session_seconds, day.end - now) + _TTL_GRACE_SECONDS,
                max(day.end - now, 1) + _TTL_GRACE_SECONDS,
                member,
                0 if replay_marker is None else 1,
                day.name,
                content_id,
                viewer,
                int(crawler),
                day.end - now + self._day_keys_seconds,
                # A replayed view's session is written now, though the view was made at ``at``.
                "" if replay_marker is None else math.floor(self.clock()),
                "",  # the daily counter is one of this call's keys (a single Redis)
            ),
            replay_marker,
        )

    def _remember_content_keys(
        self, member: str, content_type: str, content_id: str, day: str
    ) -> tuple[str, ...]:
        """The keys of one content's views on ``day`` (its name first), built once and kept
        for the next views of that content: popular contents are viewed again and again."""
        keys = self.shards.of(content_type, content_id)
        content_keys = (
            day,
            keys.pending(content_type, content_id),
            keys.syncing(content_type, content_id),
            keys.database_count(content_type, content_id),
            keys.days(content_type, content_id),
            keys.uniques(content_type, content_id, day),
            keys.ranking(content_type, day),
            keys.blocked(day),
        )
        if len(self._content_keys) >= CONTENT_KEYS:
            self._content_keys.clear()  # a crude bound, as for the known counts
        self._content_keys[member] = content_keys
        return content_keys

    async def track_crawler_view(self, content_type: str, content_id: str | int) -> TrackResult:
        """Count one crawler view of a content apart, and read its count in the same round
        trip: a crawler view never reaches the view count, the rules or any viewer's keys, only
        the content's crawler views of the day (see docs/history.md). ``counted`` is false.

        Raises:
            InvalidKeyError: for a bad content type or id.
            LateReply, redis.RedisError, MalformedReplyError: as :meth:`track_view`.
        """
        return await self.track_valid_crawler_view(
            validate_content_type(content_type), validate_content_id(content_id)
        )

    async def track_valid_crawler_view(self, content_type: str, content_id: str) -> TrackResult:
        """:meth:`track_crawler_view` for names the caller has validated already."""
        self.refuse_impossible_id(content_type, content_id)
        call = self._view_call(content_type, content_id, "", self.clock(), crawler=True)
        return await self._decide(content_type, content_id, call)

    async def _send_views(
        self, calls: list[ViewCall], early: Early | None = None
    ) -> list[_ViewReply]:
        """Decide a batch of views in one ``record_views`` call; one reply per view, in order.

        On a cluster, one call per content shard: a view whose shard failed gets the exception
        as its reply (the views of other shards were decided), and each shard's replies go to
        ``early`` as they come: a slow node's decisions do not hold back the other shards'
        (see :meth:`ShardedRecording.send` for what still does).
        """
        if self._sharded is not None:
            replies = await self._sharded.send(calls, _view_replies, early)
            decided = [
                (call, reply)
                for call, reply in zip(calls, replies, strict=True)
                if not isinstance(reply, BaseException)
            ]
            self._learn_counts([call for call, _ in decided], [reply for _, reply in decided])
            return replies
        keys = self.keys
        call_keys: list[str] = [keys.dirty, keys.epoch, keys.sync_batch]
        args: list[Any] = list(self._limit_args)
        for view_keys, view_args, _ in calls:
            call_keys += view_keys
            args += view_args
        call_keys += [marker for _, _, marker in calls if marker is not None]
        if self.script_connection is not None:
            reply = await self.script_connection.run_script(
                self.scripts.record_views, call_keys, args
            )
        else:
            reply = await self.scripts.record_views(keys=call_keys, args=args)
        replies = _view_replies(reply, len(calls))
        self._learn_counts(calls, replies)
        return replies

    def _learn_counts(self, calls: list[ViewCall], replies: list[_ViewReply]) -> None:
        """Count the decided views in the metrics and remember their contents' counts."""
        self.metrics.views_decided(replies)
        known = self._known_counts
        if len(known) > KNOWN_COUNTS:
            known.clear()  # a crude bound: counts are re-learned from the next replies
        for (_, view_args, _), (_, _, pending, syncing, cached, _, _) in zip(
            calls, replies, strict=True
        ):
            if cached is not None or self.store is None:  # no store: the database part is 0
                known[view_args[5]] = (cached or 0) + pending + syncing

    async def replay(self, events: Sequence[OutboxEvent]) -> list[bool | None]:
        """Offer views kept during an outage, with their original times, in one script call.

        Each event is decided by the same script as a live view, with a marker that makes its
        decision idempotent: an event replayed twice (a replayer killed before it deleted the
        event) is decided once. Returns, per event, whether it counted, or ``None`` when it was
        decided by an earlier replay.
        """
        calls = []
        for event in events:
            content_type = validate_content_type(event.content_type)
            content_id = validate_content_id(event.content_id)
            calls.append(
                self._view_call(
                    content_type,
                    content_id,
                    validate_viewer(event.viewer),
                    event.viewed_at,
                    self.shards.of(content_type, content_id).replay_marker(event.event_id),
                )
            )
        replies = await self._send_views(calls)
        for reply in replies:
            if isinstance(reply, BaseException):  # a shard failed: the batch is replayed again
                raise reply
        return [None if reply[0] == -1 else reply[0] == 1 for reply in replies]

    def _calendar_day(self, now: int) -> CalendarDay:
        """The calendar day of ``now`` in the configured zone (computed once per day)."""
        day = self._day
        if day is None or not day.start <= now < day.end:
            day = calendar_day(now, self._zone)
            if self._day is None or day.start >= self._day.start:
                self._day = day  # replays of older days must not evict today
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
        # One read per content shard (each with its own epoch and batch), concurrently; the
        # counts no shard has cached are then read from the database together.
        reads = await self._read_shards(content_type, ids)
        merged = await self._complete(content_type, reads)
        return {content_id: merged[content_id] for content_id in ids}

    async def _read_shards(self, content_type: str, ids: Sequence[str]) -> list[_ShardRead]:
        """:meth:`_read_raw` of ``ids``, one call per content shard they are in."""
        if not self._clustered:
            return [await self._read(content_type, list(ids), self.keys)]
        by_shard: dict[int, list[str]] = {}
        for content_id in ids:
            by_shard.setdefault(self.shards.index(content_type, content_id), []).append(content_id)
        return list(
            await asyncio.gather(
                *(
                    self._read(content_type, shard_ids, self.shards.schemas[shard])
                    for shard, shard_ids in by_shard.items()
                )
            )
        )

    async def _read(self, content_type: str, ids: list[str], keys: KeySchema) -> _ShardRead:
        raw, epoch, batch_id = await self._read_raw(content_type, ids, keys)
        return _ShardRead(keys, raw, epoch, batch_id)

    async def _read_raw(
        self, content_type: str, ids: list[str], keys: KeySchema
    ) -> tuple[dict[str, _RawCounts], int, str]:
        """What Redis holds for ``ids`` (all of the shard of ``keys``), the shard's sync epoch
        and its unsettled batch, in one call."""
        per_content = self._parts_keys(content_type, ids, keys)
        reply = await self._run(
            self.scripts.read_counts, [keys.epoch, keys.sync_batch, *per_content], []
        )
        if not isinstance(reply, list) or len(reply) != 2 + 3 * len(ids):
            raise MalformedReplyError(f"unexpected reply from read_counts: {reply!r:.80}")
        raw = {
            content_id: _RawCounts(
                _count(reply[2 + 3 * n]), _count(reply[3 + 3 * n]), _cached(reply[4 + 3 * n])
            )
            for n, content_id in enumerate(ids)
        }
        return raw, int(reply[0]), _text(reply[1])

    @staticmethod
    def _parts_keys(content_type: str, ids: list[str], keys: KeySchema) -> list[str]:
        """Pending, syncing and cached database count keys of each id, in that order."""
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
        keys = self.shards.of(content_type, content_id)
        raw, _, _ = await self._read_raw(content_type, [content_id], keys)
        return raw[content_id].pending + raw[content_id].syncing

    async def get_database_view_count(self, content_type: str, content_id: str | int) -> int:
        """The count stored in the database, read with SQL (0 without a store)."""
        content_type = validate_content_type(content_type)
        content_id = validate_content_id(content_id)
        if self.store is None:
            return 0
        return await self.store.read_count(content_type, content_id)

    async def _complete(
        self, content_type: str, reads: list[_ShardRead]
    ) -> dict[str, ViewCount | None]:
        """Fill in database counts missing from the Redis cache; never raises (a count that
        cannot be completed now is ``None``: the view it comes with is recorded all the same).
        The counts missing in every shard read are read from the database together."""
        result: dict[str, ViewCount | None] = {}
        for read in reads:
            for content_id, parts in read.raw.items():
                result[content_id] = (
                    ViewCount(parts.database, parts.pending, parts.syncing)
                    if parts.database is not None
                    else None
                )
        missing = [read.only(_uncached(read)) for read in reads if _uncached(read)]
        if not missing:
            return result
        if self.store is None:
            for read in missing:
                for content_id, parts in read.raw.items():
                    result[content_id] = ViewCount(0, parts.pending, parts.syncing)
            return result
        # Concurrent requests that miss the same content (a flash crowd on a new page) share one
        # database read: the others wait for it and then read the cached count from Redis.
        only_one = len(missing) == 1 and len(missing[0].raw) == 1
        key = (content_type, next(iter(missing[0].raw))) if only_one else None
        leader = self._fills.get(key) if key is not None else None
        try:
            if leader is not None:
                await asyncio.shield(leader)
                self._found(result, await self._reread(content_type, missing))
                return result
            if key is not None:
                self._fills[key] = asyncio.get_running_loop().create_future()
            try:
                await self._fill_missing(content_type, missing, result)
            finally:
                if key is not None:
                    self._fills.pop(key).set_result(None)
        except Exception as exc:
            self._database_errors.report(exc)
        return result

    async def _reread(self, content_type: str, reads: list[_ShardRead]) -> list[_ShardRead]:
        """Read Redis again for the ids of ``reads`` (each shard's current epoch and batch)."""
        return list(
            await asyncio.gather(
                *(self._read(content_type, list(read.raw), read.keys) for read in reads)
            )
        )

    @staticmethod
    def _found(result: dict[str, ViewCount | None], reads: list[_ShardRead]) -> None:
        """Put the counts ``reads`` found cached into ``result``."""
        for read in reads:
            for content_id, parts in read.raw.items():
                if parts.database is not None:
                    result[content_id] = ViewCount(parts.database, parts.pending, parts.syncing)

    async def _fill_missing(
        self, content_type: str, missing: list[_ShardRead], result: dict[str, ViewCount | None]
    ) -> None:
        """Read missing database counts into ``result`` and the Redis cache (a few attempts)."""
        for _attempt in range(_FILL_ATTEMPTS):
            # A page never waits on a slow database: a short deadline of its own, and no reads at
            # all while the database is failing (the count is left out instead).
            if not self.database_breaker.allow():
                return
            fill = self._start_fill(content_type, missing)
            if fill is None:
                return  # the database is busy with reads already: the count is left out
            try:
                # The read goes on after the deadline (it fills the cache for the next request);
                # its outcome reaches the breaker when it ends (_fill_done).
                async with asyncio.timeout(self.settings.database_request_timeout):
                    filled = await asyncio.shield(fill)
            except TimeoutError as exc:
                self._database_errors.report(exc)
                return
            except Exception:
                return  # reported when the read ended
            result.update(filled)
            left = [read.only([i for i in read.raw if i not in filled]) for read in missing]
            left = [read for read in left if read.raw]
            if not left:
                return
            # A sync moved views while the database was read: read Redis again and retry.
            reread = await self._reread(content_type, left)
            self._found(result, reread)
            missing = [read.only(_uncached(read)) for read in reread if _uncached(read)]
            if not missing:
                return

    def _start_fill(
        self, content_type: str, missing: list[_ShardRead]
    ) -> asyncio.Task[dict[str, ViewCount]] | None:
        """Start reading missing database counts into the cache, unless
        ``MAX_FILLS_IN_FLIGHT`` reads are running already."""
        if len(self._fill_tasks) >= MAX_FILLS_IN_FLIGHT:
            self.database_breaker.inconclusive()  # allowed, but not tried
            return None
        task = asyncio.create_task(
            self._bounded_fill(content_type, missing),
            name=f"viewmw: read {content_type} counts",
        )
        self._fill_tasks.add(task)
        task.add_done_callback(self._fill_done)
        return task

    async def _bounded_fill(
        self, content_type: str, missing: list[_ShardRead]
    ) -> dict[str, ViewCount]:
        filled = await self._fill_cache(content_type, missing)
        for content_id, count in filled.items():  # the deferred mode shows these next
            self._known_counts[f"{content_type}:{content_id}"] = count.total
        return filled

    def _fill_done(self, task: asyncio.Task[dict[str, ViewCount]]) -> None:
        """Tell the database breaker how a cache fill ended."""
        self._fill_tasks.discard(task)
        if task.cancelled():
            self.database_breaker.inconclusive()
            return
        exc = task.exception()
        if exc is None:
            self.database_breaker.success()
        elif isinstance(exc, _CacheNotStored):
            # The database answered; Redis failed to store the count (a node died, say). That
            # is the Redis path's failure, not a reason to stop reading the database.
            self.database_breaker.success()
            self._database_errors.report(exc.failure)
        else:
            self.database_breaker.failure()
            self._database_errors.report(exc)

    async def _fill_cache(
        self, content_type: str, missing: list[_ShardRead]
    ) -> dict[str, ViewCount]:
        """Read missing database counts and cache them, unless a sync moved views meanwhile.

        The counts and the ledger entries of the shards' unsettled batches come from one
        database snapshot. If a shard's unsettled batch is already committed, the database
        includes its views, which Redis still shows as syncing: they are subtracted so that the
        cache holds the database's count as of the last settle, which is what the settle step
        adds to. Each shard's counts are then stored by one call in its slot (concurrently); a
        shard where a sync moved views meanwhile stores nothing.
        """
        assert self.store is not None
        ids = [content_id for read in missing for content_id in read.raw]
        batches = {read.batch_id for read in missing if read.batch_id}
        # Past the background deadline the database is failing, not merely slow for a request
        # (the deadline is the database's alone: storing the counts is Redis' work).
        async with asyncio.timeout(self.settings.database_timeout):
            if len(batches) > 1:  # shards of a cluster with batches of their own
                counts, committed = await self.store.read_counts_and_batches(
                    content_type, ids, batches
                )
            else:
                counts, done = await self.store.read_counts(
                    content_type, ids, next(iter(batches), "")
                )
                committed = batches if done else set()
        outcomes = await asyncio.gather(
            *(self._store_counts(content_type, read, counts, committed) for read in missing),
            return_exceptions=True,
        )
        stored = [outcome for outcome in outcomes if isinstance(outcome, dict)]
        failed = [outcome for outcome in outcomes if not isinstance(outcome, dict)]
        for failure in failed:
            if not isinstance(failure, _CacheNotStored) or not stored:
                raise failure
            # A node that failed leaves its shard's counts out; the other shards' stand.
            self._database_errors.report(failure.failure)
        return {content_id: count for part in stored for content_id, count in part.items()}

    async def _store_counts(
        self,
        content_type: str,
        read: _ShardRead,
        counts: dict[str, int],
        committed: set[str],
    ) -> dict[str, ViewCount]:
        """Cache one shard's database counts under the epoch it was read at."""
        ids = list(read.raw)
        subtract = read.batch_id in committed
        bases = [
            max(0, counts[content_id] - (read.raw[content_id].syncing if subtract else 0))
            for content_id in ids
        ]
        per_content = self._parts_keys(content_type, ids, read.keys)
        try:
            reply = await self.scripts.fill_cache(
                keys=[read.keys.epoch, *per_content],
                args=[read.epoch, DATABASE_COUNT_TTL_SECONDS, *bases],
            )
        except Exception as exc:
            raise _CacheNotStored(exc) from exc
        if not int(reply[0]):
            logger.debug("a sync moved views during a count read; %s not cached", content_type)
            return {}
        return {
            content_id: ViewCount(
                database=int(reply[3 + 3 * n]),
                pending=int(reply[1 + 3 * n]),
                syncing=int(reply[2 + 3 * n]),
            )
            for n, content_id in enumerate(ids)
        }

    async def invalidate_database_counts(self, contents: Iterable[tuple[str, str]]) -> None:
        """Drop cached database counts (after the database changed behind Redis' back).

        The epoch moves in the same transaction, so no cache fill that read the database before
        can store its older value afterwards.
        """
        # A single Redis' epoch moves even when no content is named: the caller says the
        # database changed, so no fill begun before may store what it read.
        by_shard: dict[int, list[str]] = {} if self._clustered else {0: []}
        for content_type, content_id in contents:
            shard = self.shards.index(content_type, content_id)
            by_shard.setdefault(shard, []).append(
                self.shards.schemas[shard].database_count(content_type, content_id)
            )
        for shard, keys in by_shard.items():  # one transaction per shard: each is one slot
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(self.shards.schemas[shard].epoch)
                for start in range(0, len(keys), 1000):
                    pipe.delete(*keys[start : start + 1000])
                await pipe.execute()

    def calendar_day_name(self) -> str:
        """Today's date (``YYYY-MM-DD``) in the configured zone, by the tracker's clock."""
        return self._calendar_day(math.floor(self.clock())).name


def _uncached(read: _ShardRead) -> list[str]:
    """The ids of ``read`` whose database count Redis does not hold."""
    return [content_id for content_id, parts in read.raw.items() if parts.database is None]


class _CacheNotStored(Exception):
    """A cache fill read the database but Redis failed to store the counts."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a deferred view's outcome, so a failure is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedReplyError(f"unexpected count from Redis: {value!r:.80}")
    return value


def _cached(value: Any) -> int | None:
    if isinstance(value, int) and value == -1:
        return None
    return _count(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value or "")
