"""The guarded sync: moves pending views into the database exactly once, whatever fails.

Protocol (see docs/sync.md):

0. Lock: one sync at a time (a token with an expiry, renewed while the sync runs), and with it a
   fence: a number that grows with every lock taken. Every later step proves, in the same atomic
   script that reads or changes the batch, that the run still holds the lock and owns the batch
   (its id and fence); the database commit refuses a fence older than one it already took. A
   run whose lock expired stops without committing and raises :class:`LockLostError`.
1. Recover: an unsettled batch left by a failed sync is taken over under the new fence, committed
   if the ledger lacks it, then settled.
2. Snapshot: pending counts move into a new batch, a chunk of contents per atomic script call
   (pending -> syncing, amounts recorded under the batch id). Found through the dirty set.
   Content types that the app counts in another table than this sync would (see
   :mod:`viewmw.mapping`) are refused: their views stay pending.
3. Commit: one database transaction records the batch id in the ledger and adds every delta in
   bulk. A batch id already in the ledger means the batch is in: skip to settle. The batch's
   history rows are made while the transaction runs, and upserted in it as they come.
4. Settle: syncing -> cached database count, per content, atomically; then the batch is deleted.
5. Cleanup: previous days' daily counters are deleted, only after every batch has settled.

At every instant, for every content, database + pending + syncing equals the views accepted.

On a Redis Cluster the lock is taken once, every content shard's unsettled batch is recovered,
then steps 2-4 run shard by shard, each batch step one call in the shard's slot; the lock being
in another slot, each call checks the shard's fence floor instead of the lock (docs/keys.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis

from viewmw.calendar_day import local_date
from viewmw.errors import LockLostError, SyncError
from viewmw.keys import KeySchema
from viewmw.mapping import mapping_conflicts
from viewmw.metrics.recording import record_sync
from viewmw.replies import text_of
from viewmw.scripts import Scripts
from viewmw.settings import Settings
from viewmw.shard_reads import run_on_shards
from viewmw.store import DayDelta, Store

logger = logging.getLogger("viewmw.sync")

StepHook = Callable[[str], Awaitable[None]]
"""Called with the name of each step boundary (tests inject failures here)."""

ProgressHook = Callable[[int, int], None]
"""Called with (contents moved so far, contents that were pending when the run started)."""


@dataclass(slots=True)
class SyncReport:
    """What one sync run did.

    Attributes:
        already_running: another sync held the lock; nothing was done.
        batches: batches committed by this run (recovered ones included).
        recovered_batches: unsettled batches left by an earlier run, finished by this one.
        contents: contents whose counts moved into the database.
        views: views moved into the database.
        cleaned_keys: previous days' tracking keys deleted.
        duration: seconds the run took.
        batch_ids: the ids of the batches this run committed.
        refused: content type -> why its views were left pending (the app counts that type in
            another table than this sync would move it to).
        unmatched_contents: contents among ``contents`` whose row does not exist in their mapped
            table; their views were kept in ``viewmw_unmatched_views`` (``viewmw unmatched``).
        unmatched_views: views among ``views`` kept that way.
    """

    already_running: bool = False
    batches: int = 0
    recovered_batches: int = 0
    contents: int = 0
    views: int = 0
    cleaned_keys: int = 0
    duration: float = 0.0
    batch_ids: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    unmatched_contents: int = 0
    unmatched_views: int = 0


@dataclass(frozen=True, slots=True)
class _Batch:
    batch_id: str
    started_at: datetime


@dataclass(frozen=True, slots=True)
class _Lease:
    """The lock as one run holds it: its token, and the fence taken with it."""

    token: str
    fence: int


@dataclass(slots=True)
class _Walk:
    """Where the run's walk (SSCAN) through the contents it took has got to."""

    cursor: str = "0"


# Items per read of a sealed batch: one script call per page keeps Redis responsive.
_PAGE = 5000

_T = TypeVar("_T")
_END = object()


class _Ahead(Generic[_T]):
    """An async iterator's items, made by a task of its own as fast as it can.

    The consumer gets them in order; while it waits (for the database), the task runs. A failure
    of the task reaches the consumer after the items made before it. :meth:`aclose` stops the
    task when the consumer stops early.
    """

    def __init__(self, source: AsyncIterator[_T]) -> None:
        self._made: asyncio.Queue[object] = asyncio.Queue()
        self._task = asyncio.create_task(self._make(source))

    async def _make(self, source: AsyncIterator[_T]) -> None:
        try:
            async for item in source:
                self._made.put_nowait(item)
        finally:
            self._made.put_nowait(_END)

    def __aiter__(self) -> _Ahead[_T]:
        return self

    async def __anext__(self) -> _T:
        item = await self._made.get()
        if item is _END:
            self._made.put_nowait(_END)  # the end stays the end
            await self._task  # raises the task's failure, if any
            raise StopAsyncIteration
        return item  # type: ignore[return-value]  # only _make puts items

    async def aclose(self) -> None:
        """Stop making items, and wait until the task has ended."""
        self._task.cancel()
        await asyncio.wait([self._task])
        if not self._task.cancelled():
            self._task.exception()  # seen by the consumer, or not needed by it: not an error


class ViewSync:
    """Runs the guarded sync and the cleanup.

    Args:
        redis: a ``redis.asyncio`` client (give it a generous socket timeout: a sync is not a
            request).
        store: the database side.
        settings: key prefix and time zone.
        batch_contents: contents per batch (one database transaction each).
        chunk_contents: contents per snapshot or settle script call.
        lock_seconds: lock expiry; the lock is renewed every third of it while the sync runs.
        on_step: awaited at every step boundary with its name (``locked``, ``snapshot``,
            ``sealed``, ``before_commit``, ``committed``, ``settle``, ``cleanup``; and
            ``history`` before each chunk of a batch's history rows is made, which happens
            while the batch's transaction runs).
        clock: seconds since the epoch; decides which calendar days are over.
    """

    def __init__(
        self,
        redis: Redis,
        store: Store,
        settings: Settings | None = None,
        *,
        batch_contents: int = 50_000,
        chunk_contents: int = 5_000,
        lock_seconds: float = 60.0,
        on_step: StepHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if batch_contents < 1 or chunk_contents < 1 or lock_seconds <= 0:
            raise ValueError("batch_contents, chunk_contents and lock_seconds must be positive")
        self.redis = redis
        self.store = store
        self.settings = settings or Settings()
        self.shards = self.settings.content_shards()
        # The keys this instance syncs: a single Redis' (on a cluster, see _shard_syncs).
        self.keys = self.shards.schemas[0]
        self.scripts = Scripts.register(redis)
        self.batch_contents = batch_contents
        self.chunk_contents = chunk_contents
        self.lock_ms = int(lock_seconds * 1000)
        self.on_step = on_step
        self.clock = clock

    @record_sync
    async def run(self, *, force: bool = False, progress: ProgressHook | None = None) -> SyncReport:
        """Sync pending views into the database.

        Without ``force`` a run that finds nothing pending (and no unsettled batch) stops there;
        with it, cleanup runs too.

        Raises:
            LockLostError: the lock expired under this run (a stall longer than the lock time);
                it stopped without committing anything it no longer owns, and the sync holding
                the lock now finishes its work.
            SyncError: the run stopped part-way; everything it moved is safe for the next run.
            redis.RedisError, sqlalchemy.exc.SQLAlchemyError: a server failed; same guarantee.
        """
        started = time.monotonic()
        report = SyncReport()
        async with self._lock() as lease:
            if lease is None:
                report.already_running = True
                return report
            await self._step("locked")
            shards = self._shard_syncs()
            if self.shards.clustered:
                lease = await self._fenced(lease)
                lease, unsettled, totals = await self._claim_shards(lease, shards)
            else:
                unsettled, totals = [await self._current_batch()], [await self._take_dirty()]
            total = sum(totals)
            if all(batch is None for batch in unsettled) and total == 0 and not force:
                report.duration = time.monotonic() - started
                return report
            if not self.shards.clustered:
                lease = await self._fenced(lease)
            refused = await self._refused_types(report)
            # Every shard's unsettled batch is finished before any shard opens a new one.
            for shard, batch in zip(shards, unsettled, strict=True):
                if batch is not None:
                    await shard._recover(shard._shard_lease(lease), batch, report)
            for shard, shard_total in zip(shards, totals, strict=True):
                if not shard_total and self.shards.clustered:
                    continue  # a cluster's idle shards open no batch
                walk, shard_lease = _Walk(), shard._shard_lease(lease)
                while await shard._sync_one_batch(shard_lease, report, refused, walk):
                    if progress:
                        progress(report.contents, total)
            report.cleaned_keys = await self.cleanup()
        report.duration = time.monotonic() - started
        logger.info(
            "sync moved %d views of %d contents in %d batches (%d recovered), "
            "cleaned %d keys, %.2fs",
            report.views,
            report.contents,
            report.batches,
            report.recovered_batches,
            report.cleaned_keys,
            report.duration,
        )
        return report

    # Shards -------------------------------------------------------------------------------------

    def _shard_syncs(self) -> list[ViewSync]:
        """Who syncs each content shard: this instance on a single Redis; on a Redis Cluster a
        copy per shard, bound to its keys (every batch step is one call in the shard's slot)."""
        if not self.shards.clustered:
            return [self]
        syncs = []
        for keys in self.shards.schemas:
            shard = copy.copy(self)
            shard.keys = keys
            syncs.append(shard)
        return syncs

    def _shard_lease(self, lease: _Lease) -> _Lease:
        """The lease as this instance's batch scripts check it: the lock's token on a single
        Redis; on a cluster, where the lock is in another slot, no token (the shard's fence
        floor decides, see lua/shared/holds_sync.lua)."""
        return lease if not self.shards.clustered else _Lease("", lease.fence)

    async def _claim_shards(
        self, lease: _Lease, shards: list[ViewSync]
    ) -> tuple[_Lease, list[_Batch | None], list[int]]:
        """Claim every content shard of a cluster for this run, concurrently (lua/claim_shard.lua):
        from then on no older sync acts on any of them, so the unsettled batches and dirty sets
        read here stay as read. Returns the lease (its fence moved past a floor that was not
        below it) and, per shard, its unsettled batch and how many contents the run has."""
        for _attempt in range(2):
            calls = [
                ([keys.sync_fence_floor, keys.sync_batch, keys.draining, keys.dirty], [lease.fence])
                for keys in (shard.keys for shard in shards)
            ]
            # One pipeline per node: a claim per shard, all at once, on a few connections.
            replies = await run_on_shards(self.redis, self.scripts.claim_shard, calls)
            floors = [int(reply[1]) for reply in replies if not int(reply[0])]
            if not floors:
                batches = [_batch_of(text_of(reply[1]), text_of(reply[2])) for reply in replies]
                return lease, batches, [int(reply[3]) for reply in replies]
            # Redis lost the fence counter, and a shard kept the floor of a sync as new.
            lease = await self._raise_fence(lease, max(floors))
        raise LockLostError("a newer sync took this run's shards; nothing was done")

    @property
    def _guard(self) -> str:
        """The key the batch scripts check ownership by: the lock, or the shard's fence floor."""
        return self.keys.sync_fence_floor if self.shards.clustered else self.keys.sync_lock

    # Lock and fence -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[_Lease | None]:
        """Hold the sync lock for the block (``None`` when another sync has it), renewing it.

        Raises :class:`LockLostError` after a block that ended normally if the lock was no longer
        this run's when it ended: the run outlived its lock, and must not report success.
        """
        keys = self.keys
        token = uuid.uuid4().hex
        fence = int(
            await self.scripts.take_lock(
                keys=[keys.sync_lock, keys.sync_fence], args=[token, self.lock_ms]
            )
        )
        if not fence:
            yield None
            return
        done = asyncio.Event()
        renewal = asyncio.create_task(self._renew(token, done))
        released: bool | None = None
        try:
            yield _Lease(token, fence)
        finally:
            done.set()
            renewal.cancel()
            # Bounded: a renewal stuck in a client's retries is left to end on its own (its
            # outcome collected), and the lock to expire if it cannot be released in time.
            await asyncio.wait({renewal}, timeout=self.lock_ms / 1000)
            renewal.add_done_callback(_collected)
            with contextlib.suppress(Exception):  # a Redis failure here is not a lost lock
                async with asyncio.timeout(self.lock_ms / 1000):
                    released = bool(
                        int(await self.scripts.release_lock(keys=[keys.sync_lock], args=[token]))
                    )
        if released is False:
            raise LockLostError(
                "the sync lock expired before this sync ended; the sync that took it over "
                "finishes the work"
            )

    async def _renew(self, token: str, done: asyncio.Event) -> None:
        """Renew the lock every third of its time until ``done`` (or until it is lost).

        ``done`` ends the loop even if a client library swallowed the task's cancellation in
        the middle of a call (redis-py's cluster client can, while a node dies): the run's end
        would otherwise wait for a renewal that never stops.
        """
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.lock_ms / 3000)
                return
            try:
                renewed = await self.scripts.renew_lock(
                    keys=[self.keys.sync_lock], args=[token, self.lock_ms]
                )
            except Exception:
                logger.warning("renewing the sync lock failed; will retry", exc_info=True)
                continue
            if not int(renewed):
                logger.warning("the sync lock was lost; this sync will stop at its next step")
                return

    async def _fenced(self, lease: _Lease) -> _Lease:
        """``lease``, with a fence newer than any the database has seen.

        Only differs when Redis lost its fence counter (a flush, a new server): the counter is
        then moved past the database's fence, or every commit would be refused as stale.
        """
        floor = await self.store.read_fence(self.keys.prefix)
        if lease.fence > floor:
            return lease
        return await self._raise_fence(lease, floor)

    async def _raise_fence(self, lease: _Lease, floor: int) -> _Lease:
        """``lease`` with a fence above ``floor``, taken from the fence counter."""
        fence = int(
            await self.scripts.raise_fence(
                keys=[self.keys.sync_lock, self.keys.sync_fence], args=[lease.token, floor]
            )
        )
        if fence < 0:
            raise LockLostError("the sync lock expired before the first step; nothing was done")
        logger.warning("the sync fence in Redis was behind %d; moved to %d", floor, fence)
        return _Lease(lease.token, fence)

    async def _refused_types(self, report: SyncReport) -> list[str]:
        """Content types whose views this sync must leave pending: it would move them somewhere
        else than the app reads them (see :mod:`viewmw.mapping`)."""
        report.refused = await mapping_conflicts(self.redis, self.keys, self.store)
        for message in report.refused.values():
            logger.warning("%s", message)
        return sorted(report.refused)

    async def _step(self, name: str) -> None:
        if self.on_step is not None:
            await self.on_step(name)

    # Batches ------------------------------------------------------------------------------------

    async def _recover(self, lease: _Lease, batch: _Batch, report: SyncReport) -> None:
        """Finish a batch that an earlier sync left unsettled, under this run's fence."""
        logger.warning("recovering unsettled sync batch %s", batch.batch_id)
        # Sealed (and so made this run's) first, read after: what is committed is exactly what
        # will be settled, and the sync that left the batch can no longer touch it.
        await self._seal(lease, batch)
        if await self._commit_and_settle(lease, batch, report):
            report.recovered_batches += 1

    async def _take_dirty(self) -> int:
        """Move the dirty set into the run's own set; returns how many contents the run has.

        The run works through that set only: views that keep arriving dirty the (new) dirty set
        and wait for the next run, so a run always ends. A set left by a run that died is merged,
        not lost.
        """
        return int(await self.scripts.take_dirty(keys=[self.keys.draining, self.keys.dirty]))

    async def _sync_one_batch(
        self, lease: _Lease, report: SyncReport, refused: list[str], walk: _Walk
    ) -> bool:
        """Snapshot up to ``batch_contents`` of the run's contents, commit, settle.

        Returns whether contents of the run are left for another batch.
        """
        batch = _Batch(uuid.uuid4().hex, datetime.fromtimestamp(self.clock(), UTC))
        opened = await self.scripts.open_batch(
            keys=[self._guard, self.keys.sync_batch],
            args=[lease.token, batch.batch_id, batch.started_at.isoformat(), lease.fence],
        )
        if int(opened) == -1:
            raise LockLostError("the sync lock expired; the next sync carries on")
        if int(opened) == -2:
            raise SyncError("an unsettled batch appeared while this sync held the lock")
        taken, left = 0, 1
        while taken < self.batch_contents and left:
            await self._step("snapshot")
            size = min(self.chunk_contents, self.batch_contents - taken)
            took, left = await self._snapshot_chunk(lease, batch, size, refused, walk)
            taken += took
        await self._seal(lease, batch)
        await self._commit_and_settle(lease, batch, report)
        return left > 0

    async def _snapshot_chunk(
        self, lease: _Lease, batch: _Batch, size: int, refused: list[str], walk: _Walk
    ) -> tuple[int, int]:
        """Move up to ``size`` contents into the batch (the next page of the walk through the
        run's set); returns how many were taken from the set and how many are left in it."""
        keys = self.keys
        reply = await self.scripts.snapshot(
            keys=[
                self._guard,
                keys.sync_batch,
                keys.sync_batch_items(batch.batch_id),
                keys.draining,
                keys.epoch,
                keys.dirty,
                keys.sync_batch_days(batch.batch_id),
            ],
            args=[
                lease.token,
                batch.batch_id,
                size,
                lease.fence,
                walk.cursor,
                self._today(),
                keys.pending_template,
                keys.syncing_template,
                keys.days_template,
                *refused,
            ],
        )
        if int(reply[0]) < 0:
            raise LockLostError("the sync lock expired during the snapshot; the next sync recovers")
        # A walk that came round with members left (none are added during a run) starts again.
        walk.cursor = text_of(reply[3])
        return int(reply[4]), int(reply[2])

    async def _seal(self, lease: _Lease, batch: _Batch) -> None:
        keys = self.keys
        reply = await self.scripts.seal(
            keys=[
                self._guard,
                keys.sync_batch,
                keys.sync_batch_items(batch.batch_id),
                keys.legacy_sync_batch_items,
            ],
            args=[lease.token, batch.batch_id, lease.fence],
        )
        if int(reply) < 0:
            raise LockLostError("the sync lock expired before the commit; the next sync recovers")
        await self._step("sealed")

    async def _commit_and_settle(self, lease: _Lease, batch: _Batch, report: SyncReport) -> bool:
        """Commit the sealed batch's items under its id and this run's fence, then settle.

        What is committed is what Redis recorded under the sealed batch, read by this run while
        it still owned the batch, never what this process believes it moved: a snapshot whose
        reply was lost (and retried) still counts. Returns whether the batch had anything in it.
        """
        items = await self._batch_items(lease, batch)
        if not items:
            await self._drop_empty_batch(lease, batch)
            return False
        # A content may be in the batch with no views, for its crawler views or viewers only.
        deltas = _in_id_order({c: amount for c, (amount, _) in items.items() if amount})
        await self._step("before_commit")
        # The history rows are made (each day's viewers read from Redis) by a task of their own
        # while the transaction adds the totals and then upserts the rows made so far: this
        # process and the database work at the same time. Rows made after a failure, or for a
        # batch the ledger already holds, are never used: the transaction is rolled back.
        days = _Ahead(self._day_deltas(items))
        try:
            committed_now = await self.store.commit_batch(
                batch.batch_id,
                batch.started_at,
                deltas,
                fence=lease.fence,
                fence_scope=self.keys.prefix,
                days=days,
            )
        finally:
            await days.aclose()
        await self._step("committed")
        await self._settle(lease, batch)
        if committed_now:
            report.batches += 1
            report.contents += len(deltas)
            report.views += sum(deltas.values())
            report.batch_ids.append(batch.batch_id)
            report.unmatched_contents += len(committed_now.unmatched)
            report.unmatched_views += committed_now.unmatched_views
            _warn_unmatched(batch.batch_id, committed_now.unmatched)
        return True

    async def _settle(self, lease: _Lease, batch: _Batch) -> None:
        """Settle every item of the committed batch, up to ``chunk_contents`` per script call.

        The script walks the batch's items itself (an HSCAN cursor this run keeps), so no
        member list travels to Redis; the call that settles the last item deletes the batch.
        """
        keys = self.keys
        cursor, left = "0", 1
        while left:
            await self._step("settle")
            reply = await self.scripts.settle(
                keys=[
                    keys.sync_batch,
                    keys.sync_batch_items(batch.batch_id),
                    keys.epoch,
                    self._guard,
                    keys.sync_batch_days(batch.batch_id),
                ],
                args=[
                    batch.batch_id,
                    lease.token,
                    lease.fence,
                    cursor,
                    self.chunk_contents,
                    keys.syncing_template,
                    keys.database_count_template,
                    keys.ranking_template,
                ],
            )
            if int(reply[0]) < 0:
                raise LockLostError(
                    "the sync lock expired after the commit; the next sync settles the batch"
                )
            # A walk that came round with items left starts again from the beginning.
            left, cursor = int(reply[1]), text_of(reply[2])

    async def _current_batch(self) -> _Batch | None:
        fields = await self.redis.hgetall(self.keys.sync_batch)
        values = {text_of(k): text_of(v) for k, v in fields.items()}
        return _batch_of(values.get("id", ""), values.get("started", ""))

    async def _batch_items(
        self, lease: _Lease, batch: _Batch
    ) -> dict[tuple[str, str], tuple[int, str]]:
        """The sealed batch's items (views, encoded per-day amounts), read page by page, each
        page only while the run owns it."""
        keys = self.keys
        items: dict[tuple[str, str], tuple[int, str]] = {}
        cursor: bytes | str = "0"
        while True:
            reply = await self.scripts.read_batch(
                keys=[
                    self._guard,
                    keys.sync_batch,
                    keys.sync_batch_items(batch.batch_id),
                    keys.sync_batch_days(batch.batch_id),
                ],
                args=[lease.token, batch.batch_id, lease.fence, cursor, _PAGE],
            )
            if reply[0] == -1:
                raise LockLostError(
                    "the sync lock expired before the batch was read; the next sync recovers it"
                )
            cursor = reply[0]
            for member, amount, days in zip(
                _texts(reply[1::3]), reply[2::3], _texts(reply[3::3]), strict=True
            ):
                items[KeySchema.split_member(member)] = (int(amount), days)
            if text_of(cursor) == "0":
                return items

    async def _day_deltas(
        self, items: Mapping[tuple[str, str], tuple[int, str]]
    ) -> AsyncIterator[list[DayDelta]]:
        """The batch's per-day amounts as history rows, with each day's distinct viewers as
        Redis counts them now (and the HyperLogLog itself, so that days merge later).

        Made a chunk of ``_PAGE`` contents at a time, in the history table's key order (content
        type, then id as text): the store's upsert of each chunk then walks its index in order.
        """
        dates: dict[str, date] = {}  # a batch holds a few days: parse each once
        # Two stable sorts on plain text cost less than one on (type, id) tuples.
        contents = sorted(items, key=itemgetter(1))
        contents.sort(key=itemgetter(0))
        for start in range(0, len(contents), _PAGE):
            await self._step("history")
            rows = [
                (content_type, content_id, day, views, crawler)
                for content_type, content_id in contents[start : start + _PAGE]
                for day, (views, crawler) in decode_days(items[content_type, content_id][1]).items()
            ]
            for _, _, day, _, _ in rows:
                if day not in dates:
                    dates[day] = date.fromisoformat(day)
            if not self.settings.unique_viewers:
                yield [DayDelta(t, i, dates[day], v, c) for t, i, day, v, c in rows]
                continue
            deltas: list[DayDelta] = []
            for first in range(0, len(rows), _PAGE):
                chunk = rows[first : first + _PAGE]
                reply = await self.scripts.read_viewers(
                    keys=[self.keys.uniques(t, i, day) for t, i, day, _, _ in chunk]
                )
                for (t, i, day, v, c), estimate, sketch in zip(
                    chunk, reply[::2], reply[1::2], strict=True
                ):
                    if not int(estimate):  # past its retention: the history keeps what it has
                        deltas.append(DayDelta(t, i, dates[day], v, c))
                        continue
                    raw = sketch if isinstance(sketch, bytes) and sketch else None
                    deltas.append(DayDelta(t, i, dates[day], v, c, int(estimate), raw))
            yield deltas

    def _today(self) -> str:
        """Today's name in the configured zone: the day given to pending views that have none."""
        return local_date(self.clock(), self.settings.zone).isoformat()

    async def _drop_empty_batch(self, lease: _Lease, batch: _Batch) -> None:
        keys = self.keys
        dropped = await self.scripts.drop_batch(
            keys=[self._guard, keys.sync_batch, keys.sync_batch_items(batch.batch_id)],
            args=[lease.token, batch.batch_id, lease.fence],
        )
        if int(dropped) < 0:
            raise LockLostError("the sync lock expired; the next sync carries on")

    # Cleanup ------------------------------------------------------------------------------------

    async def cleanup(self) -> int:
        """Delete previous days' daily counters; returns how many keys went.

        Runs only when no batch is unsettled, so no tracking key disappears before the views it
        admitted are in the database. TTLs remain the backstop for anything missed.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.shards.schemas:
                pipe.exists(keys.sync_batch)
            unsettled = sum(await pipe.execute())
        if unsettled:
            logger.warning("cleanup skipped: a sync batch is unsettled")
            return 0
        today = local_date(self.clock(), self.settings.zone).isoformat()
        removed = 0
        stale: list[str | bytes] = []
        async for key in self.redis.scan_iter(match=self.keys.daily_views_pattern, count=1000):
            if text_of(key).rsplit(":", 1)[-1] < today:
                stale.append(key)
            if len(stale) >= 1000:
                removed += await self._unlink(stale)
                stale = []
        removed += await self._unlink(stale)
        return removed

    async def _unlink(self, keys: list[str | bytes]) -> int:
        if not keys:
            return 0
        await self._step("cleanup")
        return int(await self.redis.unlink(*keys))


def _collected(task: asyncio.Future[None]) -> None:
    """Retrieve a finished background task's outcome, so that no error goes unseen."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.debug("a sync lock renewal ended with %r", exc)


def _batch_of(batch_id: str, started: str) -> _Batch | None:
    """The unsettled batch a batch hash's id and start describe (``None`` when there is none)."""
    if not batch_id:
        return None
    started_at = datetime.fromisoformat(started) if started else datetime.now(UTC)
    return _Batch(batch_id, started_at)


def _warn_unmatched(batch_id: str, unmatched: Mapping[tuple[str, str], int]) -> None:
    if not unmatched:
        return
    by_type = Counter[str]()
    for (content_type, _), views in unmatched.items():
        by_type[content_type] += views
    logger.warning(
        "sync batch %s: %d views of %d contents whose rows do not exist (%s) were kept in "
        "viewmw_unmatched_views; list them with `viewmw unmatched`",
        batch_id,
        sum(unmatched.values()),
        len(unmatched),
        ", ".join(f"{content_type}: {views}" for content_type, views in sorted(by_type.items())),
    )


def decode_days(encoded: str) -> dict[str, tuple[int, int]]:
    """A batch's encoded per-day amounts (``2026-11-30=4,2026-11-30:c=2``) as day -> (views,
    crawler views)."""
    if "," not in encoded and ":" not in encoded:
        # The common case, one day's views and no crawler views ("2026-11-30=4"): no loop.
        day, _, amount = encoded.partition("=")
        return {day: (int(amount), 0)} if day else {}
    days: dict[str, tuple[int, int]] = {}
    for part in filter(None, encoded.split(",")):
        field_name, _, amount = part.partition("=")
        day, _, kind = field_name.partition(":")
        views, crawler = days.get(day, (0, 0))
        if kind == "c":
            days[day] = (views, crawler + int(amount))
        else:
            days[day] = (views + int(amount), crawler)
    return days


def _in_id_order(deltas: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """``deltas`` by content type, then content id, integer ids in numeric order.

    The store adds them in this order: each bulk statement then walks the table's index and
    pages in order instead of at random (about twice as fast on PostgreSQL).
    """
    contents = list(deltas)
    # Canonical integers sort numerically by length, then text. Three stable sorts on plain
    # keys cost about half of one sort on a tuple key.
    contents.sort(key=lambda content: content[1])
    contents.sort(key=lambda content: len(content[1]))
    contents.sort(key=lambda content: content[0])
    return {content: deltas[content] for content in contents}


def _texts(values: list[Any]) -> list[str]:
    """Reply values as text (bytes, or text from a client that decodes replies)."""
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]
