"""The guarded sync: moves pending views into the database exactly once, whatever fails.

Protocol (see docs/sync.md):

0. Lock: one sync at a time (a token with an expiry, renewed while the sync runs).
1. Recover: an unsettled batch left by a failed sync is committed if the ledger lacks it, then
   settled.
2. Snapshot: pending counts move into a new batch, a chunk of contents per atomic script call
   (pending -> syncing, amounts recorded under the batch id). Found through the dirty set.
3. Commit: one database transaction records the batch id in the ledger and adds every delta in
   bulk. A batch id already in the ledger means the batch is in: skip to settle.
4. Settle: syncing -> cached database count, per content, atomically; then the batch is deleted.
5. Cleanup: previous days' daily counters are deleted, only after every batch has settled.

At every instant, for every content, database + pending + syncing equals the views accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.asyncio import Redis

from viewmw.errors import LockLostError, SyncError
from viewmw.keys import KeySchema
from viewmw.scripts import Scripts
from viewmw.settings import Settings
from viewmw.store import Store

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
    unmatched_contents: int = 0
    unmatched_views: int = 0


@dataclass(frozen=True, slots=True)
class _Batch:
    batch_id: str
    started_at: datetime


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
            ``before_commit``, ``committed``, ``settle``, ``cleanup``).
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
        self.keys = KeySchema(self.settings.key_prefix)
        self.scripts = Scripts.register(redis)
        self.batch_contents = batch_contents
        self.chunk_contents = chunk_contents
        self.lock_ms = int(lock_seconds * 1000)
        self.on_step = on_step
        self.clock = clock

    async def run(self, *, force: bool = False, progress: ProgressHook | None = None) -> SyncReport:
        """Sync pending views into the database.

        Without ``force`` a run that finds nothing pending (and no unsettled batch) stops there;
        with it, cleanup runs too.

        Raises:
            SyncError: the run stopped part-way; everything it moved is safe for the next run.
            redis.RedisError, sqlalchemy.exc.SQLAlchemyError: a server failed; same guarantee.
        """
        started = time.monotonic()
        report = SyncReport()
        async with self._lock() as token:
            if token is None:
                report.already_running = True
                return report
            await self._step("locked")
            recovered = await self._recover(token, report)
            total = await self._take_dirty()
            if total == 0 and not force and not recovered:
                report.duration = time.monotonic() - started
                return report
            while await self._sync_one_batch(token, report):
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

    # Lock ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[str | None]:
        """Hold the sync lock for the block (``None`` when another sync has it), renewing it."""
        token = uuid.uuid4().hex
        if not await self.redis.set(self.keys.sync_lock, token, nx=True, px=self.lock_ms):
            yield None
            return
        renewal = asyncio.create_task(self._renew(token))
        try:
            yield token
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(Exception):
                await self.scripts.release_lock(keys=[self.keys.sync_lock], args=[token])

    async def _renew(self, token: str) -> None:
        while True:
            await asyncio.sleep(self.lock_ms / 3000)
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

    async def _step(self, name: str) -> None:
        if self.on_step is not None:
            await self.on_step(name)

    # Batches ------------------------------------------------------------------------------------

    async def _recover(self, token: str, report: SyncReport) -> bool:
        """Finish a batch that an earlier sync left unsettled. Returns whether there was one."""
        batch = await self._current_batch()
        if batch is None:
            return False
        logger.warning("recovering unsettled sync batch %s", batch.batch_id)
        # Sealed first, read after: what is committed is exactly what will be settled.
        await self._seal(token, batch)
        if await self._commit_and_settle(batch, report, await self._batch_items()):
            report.recovered_batches += 1
        return True

    async def _take_dirty(self) -> int:
        """Move the dirty set into the run's own set; returns how many contents the run has.

        The run works through that set only: views that keep arriving dirty the (new) dirty set
        and wait for the next run, so a run always ends. A set left by a run that died is merged,
        not lost.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sunionstore(self.keys.draining, [self.keys.draining, self.keys.dirty])
            pipe.delete(self.keys.dirty)
            total, _ = await pipe.execute()
        return int(total)

    async def _sync_one_batch(self, token: str, report: SyncReport) -> bool:
        """Snapshot up to ``batch_contents`` of the run's contents, commit, settle.

        Returns whether contents of the run are left for another batch.
        """
        batch = _Batch(uuid.uuid4().hex, datetime.fromtimestamp(self.clock(), UTC))
        opened = await self.scripts.open_batch(
            keys=[self.keys.sync_lock, self.keys.sync_batch],
            args=[token, batch.batch_id, batch.started_at.isoformat()],
        )
        if int(opened) == -1:
            raise LockLostError("the sync lock expired; the next sync carries on")
        if int(opened) == -2:
            raise SyncError("an unsettled batch appeared while this sync held the lock")
        taken, left = 0, 1
        while taken < self.batch_contents and left:
            await self._step("snapshot")
            size = min(self.chunk_contents, self.batch_contents - taken)
            left = await self._snapshot_chunk(token, batch, size)
            taken += size
        # What is committed is what Redis recorded under the sealed batch, never what this
        # process believes it moved: a snapshot whose reply was lost (and retried) still counts.
        await self._seal(token, batch)
        await self._commit_and_settle(batch, report, await self._batch_items())
        return left > 0

    async def _snapshot_chunk(self, token: str, batch: _Batch, size: int) -> int:
        """Move one chunk into the batch; returns how many of the run's contents are left."""
        keys = self.keys
        reply = await self.scripts.snapshot(
            keys=[
                keys.sync_lock,
                keys.sync_batch,
                keys.sync_batch_items,
                keys.draining,
                keys.epoch,
            ],
            args=[token, batch.batch_id, keys.prefix, size],
        )
        if int(reply[0]) < 0:
            raise LockLostError("the sync lock expired during the snapshot; the next sync recovers")
        return int(reply[2])

    async def _seal(self, token: str, batch: _Batch) -> None:
        reply = await self.scripts.seal(
            keys=[self.keys.sync_lock, self.keys.sync_batch], args=[token, batch.batch_id]
        )
        if int(reply) < 0:
            raise LockLostError("the sync lock expired before the commit; the next sync recovers")

    async def _commit_and_settle(
        self, batch: _Batch, report: SyncReport, deltas: dict[tuple[str, str], int]
    ) -> bool:
        """Commit ``deltas`` (the batch's items, as recorded in Redis) under the batch id, then
        settle. Returns whether the batch had anything in it."""
        if not deltas:
            await self._drop_empty_batch(batch)
            return False
        await self._step("before_commit")
        committed_now = await self.store.commit_batch(batch.batch_id, batch.started_at, deltas)
        await self._step("committed")
        await self._settle(batch, list(deltas))
        if committed_now:
            report.batches += 1
            report.contents += len(deltas)
            report.views += sum(deltas.values())
            report.batch_ids.append(batch.batch_id)
            report.unmatched_contents += len(committed_now.unmatched)
            report.unmatched_views += committed_now.unmatched_views
            _warn_unmatched(batch.batch_id, committed_now.unmatched)
        return True

    async def _settle(self, batch: _Batch, contents: list[tuple[str, str]]) -> None:
        keys = self.keys
        members = [keys.member(content_type, content_id) for content_type, content_id in contents]
        for start in range(0, len(members), self.chunk_contents):
            await self._step("settle")
            reply = await self.scripts.settle(
                keys=[keys.sync_batch, keys.sync_batch_items, keys.epoch],
                args=[batch.batch_id, keys.prefix, *members[start : start + self.chunk_contents]],
            )
            if int(reply[0]) < 0:
                return  # another sync settled this batch already

    async def _current_batch(self) -> _Batch | None:
        fields = await self.redis.hgetall(self.keys.sync_batch)
        values = {_text(k): _text(v) for k, v in fields.items()}
        if "id" not in values:
            return None
        started = values.get("started")
        started_at = datetime.fromisoformat(started) if started else datetime.now(UTC)
        return _Batch(values["id"], started_at)

    async def _batch_items(self) -> dict[tuple[str, str], int]:
        items: dict[tuple[str, str], int] = {}
        async for member, amount in self.redis.hscan_iter(self.keys.sync_batch_items, count=5000):
            items[KeySchema.split_member(_text(member))] = int(amount)
        return items

    async def _drop_empty_batch(self, batch: _Batch) -> None:
        # Only while it is still this batch: a batch with items is never dropped.
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.sync_batch, self.keys.sync_batch_items)
            current = await pipe.hget(self.keys.sync_batch, "id")
            items = await pipe.hlen(self.keys.sync_batch_items)
            if _text(current) != batch.batch_id or items:
                return
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(self.keys.sync_batch)
            await pipe.execute()

    # Cleanup ------------------------------------------------------------------------------------

    async def cleanup(self) -> int:
        """Delete previous days' daily counters; returns how many keys went.

        Runs only when no batch is unsettled, so no tracking key disappears before the views it
        admitted are in the database. TTLs remain the backstop for anything missed.
        """
        if await self.redis.exists(self.keys.sync_batch):
            logger.warning("cleanup skipped: a sync batch is unsettled")
            return 0
        today = datetime.fromtimestamp(self.clock(), self.settings.zone).date().isoformat()
        removed = 0
        stale: list[str | bytes] = []
        async for key in self.redis.scan_iter(match=self.keys.daily_views_pattern, count=1000):
            if _text(key).rsplit(":", 1)[-1] < today:
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


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
