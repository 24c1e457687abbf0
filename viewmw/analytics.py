"""Period questions: views per day, over the last days or all time, distinct viewers, trending.

Answers combine the per-day history the sync writes (``viewmw_daily_views``) with what Redis
still holds: each content's pending views per day, and its part of the unsettled sync batch
unless the database already holds that batch (the ledger says so). A sync that moves views while
a question is being answered moves the sync epoch; the answer is then read again, so a view is
never counted twice nor missed (see docs/history.md).

On a Redis Cluster each content shard has its own epoch and unsettled batch (docs/keys.md,
*Redis Cluster*): a read asks each shard it needs once, all of them in one pipeline per node
(:mod:`viewmw.shard_reads`), and checks each shard's epoch on its own; a content's days, its
HyperLogLogs and its part of a batch are all in its own shard.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from sqlalchemy import select

from viewmw.calendar_day import local_date
from viewmw.errors import ServiceUnavailableError
from viewmw.history_sql import HistoryReader, HistoryRow
from viewmw.keys import KeySchema, validate_content_id, validate_content_type
from viewmw.periods import DayCount, Period, PeriodCount
from viewmw.replies import text_of
from viewmw.scripts import Scripts
from viewmw.settings import Settings
from viewmw.shard_reads import ShardCall, get_each, group_by_shard, run_on_shards
from viewmw.store import Store, sync_batches
from viewmw.sync import decode_days
from viewmw.trending import top_round
from viewmw.viewer_estimates import ViewerEstimates, ViewerGroup

if TYPE_CHECKING:
    from viewmw.tracker import ViewTracker

# Reads retried when a sync moved views under every one of them (each retry is short).
_READ_ATTEMPTS = 5
_BLOCK_REASONS = ("cooldown", "viewed_today", "session_limit", "daily_limit")


@dataclass(slots=True)
class _Days:
    """Per-day views and crawler views of one content, as the history and Redis hold them."""

    views: Counter[date]
    crawlers: Counter[date]
    uniques: dict[date, int]
    sketches: dict[date, bytes]


_Groups = Callable[[dict[str, _Days]], list[tuple[str, list[date] | None]]]
"""Which (content, days) groups need distinct viewers, given what the content's days hold
(``None`` as the days: the whole period)."""


def _combined(
    ids: list[str],
    rows: list[HistoryRow],
    held: dict[str, list[str]],
    first: date | None,
    last: date | None,
) -> dict[str, _Days]:
    """The history's rows plus what Redis holds of each id (``held``: its days hash, then its
    shard's batch's part unless the database holds that batch already, each as ``read_days``
    encodes them), within the period."""
    result = {content_id: _Days(Counter(), Counter(), {}, {}) for content_id in ids}
    for row in rows:
        days = result[row.content_id]
        # A kept day's sketch alone (period totals): a stored day's sketch always comes with
        # its estimate, and these rows carry no views.
        alone = row.unique_viewers is None and not row.views and not row.crawler_views
        if row.sketch is not None and alone:
            days.sketches[row.day] = row.sketch
            continue
        days.views[row.day] += row.views
        days.crawlers[row.day] += row.crawler_views
        if row.unique_viewers is not None:
            days.uniques[row.day] = row.unique_viewers
        if row.sketch is not None:
            days.sketches[row.day] = row.sketch
    for content_id in ids:
        for encoded in held[content_id]:
            for name, (views, crawlers) in decode_days(encoded).items():
                day = date.fromisoformat(name)
                if (first is None or day >= first) and (last is None or day <= last):
                    result[content_id].views[day] += views
                    result[content_id].crawlers[day] += crawlers
                    result[content_id].uniques.setdefault(day, 0)
    return result


class ViewStats:
    """Period questions answered from the per-day history plus what is still in Redis.

    Args:
        redis: a ``redis.asyncio`` client.
        store: the database side; ``None`` answers from Redis alone.
        settings: time zone, key prefix, unique viewers, retention of the per-day keys.
        clock: seconds since the epoch; decides which day is today.
    """

    def __init__(
        self,
        redis: Redis,
        store: Store | None,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings or Settings()
        # One schema per content shard; a single Redis has one (every key its usual name).
        self.shards = self.settings.content_shards()
        self.keys = self.shards.schemas[0]
        self.scripts = Scripts.register(redis)
        self.clock = clock
        self._history = HistoryReader(store.engine) if store is not None else None

    @classmethod
    def from_tracker(cls, tracker: ViewTracker) -> ViewStats:
        """Stats on the tracker's Redis, store, settings and clock."""
        return cls(tracker.redis, tracker.store, tracker.settings, clock=tracker.clock)

    def today(self) -> date:
        """Today in the configured zone, by the clock."""
        return local_date(self.clock(), self.settings.zone)

    def _live_days(self, first: date | None, last: date | None) -> list[date]:
        """The period's days whose per-day Redis keys may still exist (within the retention)."""
        today = self.today()
        start = today - timedelta(days=self.settings.history_retention_days)
        if first is not None:
            start = max(start, first)
        end = today if last is None else min(last, today)
        return [start + timedelta(days=n) for n in range((end - start).days + 1)]

    # Counts of contents -------------------------------------------------------------------------

    async def views(
        self,
        content_type: str,
        content_id: str | int,
        period: Period,
        *,
        unique_viewers: bool = True,
    ) -> PeriodCount:
        """One content's views, distinct viewers and crawler views in ``period``
        (``unique_viewers=False``: without the estimate, see :meth:`views_many`)."""
        content_id = validate_content_id(content_id)
        counts = await self.views_many(
            content_type, [content_id], period, unique_viewers=unique_viewers
        )
        return counts[content_id]

    async def views_many(
        self,
        content_type: str,
        content_ids: Sequence[str | int],
        period: Period,
        *,
        unique_viewers: bool = True,
    ) -> dict[str, PeriodCount]:
        """:meth:`views` of many contents: one Redis read, one history query (per few thousand
        ids), then one Redis call for the estimates and the sync epoch. Keyed by the ids as
        text, in the order given.

        ``unique_viewers=False`` leaves the distinct viewers out (``None``), as when they are
        off in the settings: a list page that shows views alone reads no sketch and merges no
        HyperLogLog, several times cheaper over a period longer than the retention of the
        per-day keys (docs/measurements.md, *History reads*)."""
        content_type, ids = self._validated(content_type, content_ids)
        first, last = period.resolve(self.today())
        days, uniques = await self._days(
            content_type,
            ids,
            first,
            last,
            lambda _: [(content_id, None) for content_id in ids],
            summed=True,
            viewers=unique_viewers and self.settings.unique_viewers,
        )
        return {
            content_id: PeriodCount(
                sum(days[content_id].views.values()),
                uniques[n],
                sum(days[content_id].crawlers.values()),
            )
            for n, content_id in enumerate(ids)
        }

    async def by_day(
        self, content_type: str, content_id: str | int, period: Period
    ) -> list[DayCount]:
        """One content's counts for every day of ``period``, oldest first (days without views
        included; an open start begins at the content's first day)."""
        content_type, (content_id,) = self._validated(content_type, [content_id])
        first, last = period.resolve(self.today())

        def each_day(days: dict[str, _Days]) -> list[tuple[str, list[date] | None]]:
            return [(content_id, [day]) for day in self._span(days[content_id], first, last)]

        held, uniques = await self._days(
            content_type,
            [content_id],
            first,
            last,
            each_day,
            viewers=self.settings.unique_viewers,
        )
        days = held[content_id]
        return [
            DayCount(day, days.views[day], uniques[n], days.crawlers[day])
            for n, day in enumerate(self._span(days, first, last))
        ]

    def _span(self, days: _Days, first: date | None, last: date | None) -> list[date]:
        """Every day of the period, an open start from the first day with anything."""
        known = [*days.views, *days.crawlers, *days.uniques]
        start = first if first is not None else min(known, default=None)
        end = last if last is not None else self.today()
        if start is None or start > end:
            return []
        return [start + timedelta(days=n) for n in range((end - start).days + 1)]

    @staticmethod
    def _validated(content_type: str, content_ids: Sequence[str | int]) -> tuple[str, list[str]]:
        content_type = validate_content_type(content_type)
        if isinstance(content_ids, str | bytes):
            raise TypeError("content_ids must be a sequence of ids, not one id")
        return content_type, list(dict.fromkeys(validate_content_id(i) for i in content_ids))

    async def _days(
        self,
        content_type: str,
        ids: list[str],
        first: date | None,
        last: date | None,
        groups: _Groups,
        *,
        viewers: bool,
        summed: bool = False,
    ) -> tuple[dict[str, _Days], list[int | None]]:
        """Per-day counts of ``ids`` in the period: history + pending + the unsettled batch's
        part unless the database holds it, all as of one moment between syncs; and, with
        ``viewers``, the distinct viewers of the ``groups`` those counts call for, estimated in
        the same round trip that checks the moment held. ``summed`` has the database add up the
        history's days (they then count as one, ``date.min``).

        One ``read_days`` per content shard of ``ids`` (one call on a single Redis); each
        shard's moment is checked by its own epoch, since a sync moves each shard's views in
        batches of its own."""
        by_shard = group_by_shard(self.shards, content_type, ids)
        merges = viewers and summed and self._merges(first)
        for _attempt in range(_READ_ATTEMPTS):
            # Between two syncs a period's kept sketches are read once, then merged in Redis:
            # the call that reads the days asks whether each content's merged sketch of the
            # epoch it reads exists. Its days are those of this attempt's today.
            span = self._kept_span(first, last) if merges else None
            calls = self._read_days_calls(content_type, by_shard, span)
            replies = await run_on_shards(self.redis, self.scripts.read_days, calls)
            epochs = {shard: int(reply[0]) for shard, reply in zip(by_shard, replies, strict=True)}
            batches = [text_of(reply[1]) for reply in replies]
            committed = await self._committed(batches)
            # A batch whose commit could change the history within the epoch: no merged sketch.
            merged: dict[str, tuple[str, bool]] = {}
            if span is not None and not any(batches):
                merged = self._merged_sketches(content_type, by_shard, replies, span, epochs)
            # The sketches come with the counts when no merged sketch can serve, or when most
            # are missing (the first read after a sync); a few missing ones are read apart.
            missing = sum(not there for _, there in merged.values())
            sketches = viewers and (not merged or 2 * missing > len(merged))
            rows = await self._rows(content_type, ids, first, last, summed, sketches)
            if committed != await self._committed(batches):
                continue  # a batch was committed during the history read: read again
            held: dict[str, list[str]] = {}
            for shard_ids, reply, batch_id in zip(by_shard.values(), replies, batches, strict=True):
                for n, content_id in enumerate(shard_ids):
                    held[content_id] = [text_of(reply[2 + 2 * n])]
                    if batch_id not in committed:  # else the history holds the batch's part
                        held[content_id].append(text_of(reply[3 + 2 * n]))
            days = _combined(ids, rows, held, first, last)
            current, uniques = await self._unique_viewers(
                content_type,
                list(by_shard),
                groups(days),
                days,
                first,
                last,
                viewers,
                (epochs, merged, sketches),
            )
            if current != epochs:
                continue  # a sync moved views between Redis and the database: read again
            return days, uniques
        raise ServiceUnavailableError("syncs kept moving views during the read; try again")

    def _read_days_calls(
        self, content_type: str, by_shard: dict[int, list[str]], span: tuple[str, str] | None
    ) -> list[ShardCall]:
        """One ``read_days`` call per shard; with ``span``, asking for its merged sketches."""
        calls: list[ShardCall] = []
        for shard, shard_ids in by_shard.items():
            keys = self.shards.schemas[shard]
            merged_names = (
                []
                if span is None
                else [keys.merged_sketch_template(content_type, i, *span) for i in shard_ids]
            )
            calls.append(
                (
                    [keys.epoch, keys.sync_batch, *(keys.days(content_type, i) for i in shard_ids)],
                    [
                        keys.sync_batch_days_template,
                        "0" if span is None else "1",
                        *(KeySchema.member(content_type, i) for i in shard_ids),
                        *merged_names,
                    ],
                )
            )
        return calls

    def _merges(self, first: date | None) -> bool:
        """Whether a period from ``first`` may use merged kept sketches: it has kept days
        (before the per-day keys' retention) and there is a history to keep them."""
        oldest_live = self.today() - timedelta(days=self.settings.history_retention_days)
        kept = first is None or first < oldest_live
        return kept and self._history is not None

    def _kept_span(self, first: date | None, last: date | None) -> tuple[str, str]:
        """The first and last kept day of a period, as a merged sketch's name holds them."""
        live = self._live_days(first, last)
        kept_until = (live[0] if live else self.today()) - timedelta(days=1)
        if last is not None:
            kept_until = min(kept_until, last)
        return ("start" if first is None else first.isoformat(), kept_until.isoformat())

    def _merged_sketches(
        self,
        content_type: str,
        by_shard: dict[int, list[str]],
        replies: list[Any],
        span: tuple[str, str],
        epochs: dict[int, int],
    ) -> dict[str, tuple[str, bool]]:
        """Each id's merged kept sketch of ``span`` in the epoch its shard's ``read_days``
        read: its name, and whether that call found it (else the read is to make it)."""
        merged: dict[str, tuple[str, bool]] = {}
        for (shard, shard_ids), reply in zip(by_shard.items(), replies, strict=True):
            keys = self.shards.schemas[shard]
            found = reply[2 + 2 * len(shard_ids) :]
            for content_id, there in zip(shard_ids, found, strict=True):
                name = keys.merged_sketch(content_type, content_id, *span, epochs[shard])
                merged[content_id] = (name, bool(int(there)))
        return merged

    async def _committed(self, batch_ids: Iterable[str]) -> frozenset[str]:
        """Which of ``batch_ids`` (``""``: no batch) the ledger holds: one query, and none
        without a batch (a single Redis has at most one; a cluster one per shard)."""
        wanted = sorted({batch_id for batch_id in batch_ids if batch_id})
        if self.store is None or not wanted:
            return frozenset()
        if len(wanted) == 1:
            return frozenset(wanted) if await self.store.is_committed(wanted[0]) else frozenset()
        query = select(sync_batches.c.batch_id).where(sync_batches.c.batch_id.in_(wanted))
        async with self.store.engine.connect() as connection:
            return frozenset((await connection.execute(query)).scalars())

    async def _rows(
        self,
        content_type: str,
        ids: list[str],
        first: date | None,
        last: date | None,
        summed: bool,
        viewers: bool,
    ) -> list[HistoryRow]:
        if self._history is None:
            return []
        # A day whose HyperLogLog is still in Redis needs no sketch from the history: the live
        # one holds every viewer the sketch holds (it was copied from it).
        oldest_live = self.today() - timedelta(days=self.settings.history_retention_days)
        read = self._history.totals if summed else self._history.rows
        return await read(
            content_type,
            ids,
            first,
            last,
            sketches_before=oldest_live if viewers else None,
        )

    async def _unique_viewers(
        self,
        content_type: str,
        shards: list[int],
        groups: list[tuple[str, list[date] | None]],
        days: dict[str, _Days],
        first: date | None,
        last: date | None,
        viewers: bool,
        merged: tuple[dict[int, int], dict[str, tuple[str, bool]], bool] = ({}, {}, True),
    ) -> tuple[dict[int, int], list[int | None]]:
        """The sync epoch of each of ``shards``, and (with ``viewers``; else ``None`` each)
        the distinct viewers of each (content, days) group (``None``: the whole period): the
        days' live HyperLogLogs and the sketches kept in the history, merged by one PFCOUNT per
        group (a viewer seen on several days counts once). A day kept without a sketch adds
        its own estimate as a floor.

        ``merged``: the epochs the read saw, each id's merged kept sketch of that epoch (its
        name, and whether Redis has it) for whole-period groups that may use one, and whether
        ``days`` holds the kept sketches to make the missing ones from (else they are read
        apart): see :mod:`viewmw.viewer_estimates`. Each shard's groups are estimated by one
        call in its slot, which reads its epoch too."""
        if not viewers:
            values = await get_each(self.redis, [self.shards.schemas[n].epoch for n in shards])
            return (
                {shard: int(epoch or 0) for shard, epoch in zip(shards, values, strict=True)},
                [None] * len(groups),
            )
        epochs, names, sketches_read = merged
        period_live = self._live_days(first, last)
        position = {day: n for n, day in enumerate(period_live, start=1)}
        by_shard: dict[int, list[ViewerGroup]] = {n: [] for n in shards}
        for n, (content_id, span) in enumerate(groups):
            held = days[content_id]
            shard = self.shards.index(content_type, content_id)
            if span is None:
                floor = max(held.uniques.values(), default=0)
                group = ViewerGroup(n, content_id, 1, len(period_live), floor)
                group.kept = list(held.sketches.values())
                if content_id in names:
                    group.merged, there = names[content_id]
                    if there or not sketches_read:
                        group.kept = None  # the merged sketch holds them, or is to be made
            else:
                # The groups' days are runs of consecutive days: the live ones are a run too.
                live = [position[day] for day in span if day in position]
                floor = max((held.uniques.get(day, 0) for day in span), default=0)
                group = ViewerGroup(n, content_id, live[0] if live else 1, len(live), floor)
                group.kept = [held.sketches[day] for day in span if day in held.sketches]
            by_shard[shard].append(group)

        async def fetch(ids: list[str]) -> dict[str, list[bytes]]:
            rows = await self._rows(content_type, ids, first, last, True, True)
            sketches: dict[str, list[bytes]] = {content_id: [] for content_id in ids}
            for row in rows:
                if row.sketch is not None:
                    sketches[row.content_id].append(row.sketch)
            return sketches

        found, estimates = await ViewerEstimates(self.redis, self.scripts, self.shards).estimate(
            content_type, [day.isoformat() for day in period_live], by_shard, epochs, fetch
        )
        return found, [estimates.get(n) for n in range(len(groups))]

    # Trending -----------------------------------------------------------------------------------

    async def top(
        self, content_type: str, period: Period, limit: int = 10
    ) -> list[tuple[str, int]]:
        """The ``limit`` most viewed ids of ``period`` with their views, most first, ties by id;
        views still pending in Redis included (today's ranking is Redis' own, in real time).

        Exact: candidates are the top of the history and the top of Redis' rankings; the
        candidates' totals are completed from the other side, and the search widens until no id
        outside the candidates could reach the last place (see docs/history.md).
        """
        content_type = validate_content_type(content_type)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
        first, last = period.resolve(self.today())
        live = [day.isoformat() for day in self._live_days(first, last)]
        # A bounded period's leaders are cut at n per day, and an id outside them may have up
        # to the sum of each day's n-th: with n = limit that sum is nearly always above the
        # limit-th total (two rounds); four times the limit usually settles it in one.
        n = 4 * limit
        for _attempt in range(_READ_ATTEMPTS * 4):
            answer = await top_round(self, content_type, first, last, live, limit, n)
            if answer is None:
                continue  # a sync moved views meanwhile: the same round again
            ranked, complete = answer
            if complete:
                return ranked[:limit]
            n *= 4
        raise ServiceUnavailableError("syncs kept moving views during the ranking; try again")

    # Blocked views ------------------------------------------------------------------------------

    async def blocked(self, period: Period) -> dict[str, int]:
        """Views blocked in ``period``, by reason (every reason listed, 0 when none). Kept for
        the retention of the per-day keys only (``history_retention_days``)."""
        first, last = period.resolve(self.today())
        totals = dict.fromkeys(_BLOCK_REASONS, 0)
        # One hash per day and content shard, all in one pipeline (per node on a cluster).
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in self._live_days(first, last):
                for keys in self.shards.schemas:
                    pipe.hgetall(keys.blocked(day.isoformat()))
            replies = await pipe.execute()
        for reply in replies:
            for reason, count in reply.items():
                name = text_of(reason)
                totals[name] = totals.get(name, 0) + int(count)
        return totals
