"""Reads of the per-day history table (``viewmw_daily_views``) for :mod:`viewmw.analytics`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import and_, any_, bindparam, case, desc, func, null, select, text, union_all
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine

from viewmw.store import CHUNK_ROWS, daily_views


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One content's day as the history holds it."""

    content_id: str
    day: date
    views: int
    unique_viewers: int | None
    crawler_views: int
    sketch: bytes | None


def _sketches_needed(first: date | None, sketches_before: date | None) -> date | None:
    """``sketches_before``, or ``None`` when no day of a period from ``first`` is before it:
    a statement that names no sketch reads the key alone (an index-only scan on PostgreSQL),
    no heap page per day."""
    if sketches_before is None or (first is not None and first >= sketches_before):
        return None
    return sketches_before


def _in_period(first: date | None, last: date | None) -> Any:
    conditions = []
    if first is not None:
        conditions.append(daily_views.c.day >= first)
    if last is not None:
        conditions.append(daily_views.c.day <= last)
    return and_(True, *conditions)


# The leaders of each day, one index range each (``ix_viewmw_daily_views_type_day_views``), in
# one statement whose text is the same for any number of days (PostgreSQL).
_DAY_LEADERS = text(
    "SELECT d.day, t.content_id, t.views FROM unnest(CAST(:days AS date[])) AS d(day) "
    f"CROSS JOIN LATERAL (SELECT content_id, views FROM {daily_views.name} "
    "WHERE content_type = :type AND day = d.day AND views > 0 "
    "ORDER BY views DESC LIMIT :n) AS t"
)


def _day_leaders_union(content_type: str, days: Sequence[date], n: int) -> Any:
    """:data:`_DAY_LEADERS` for any database: one limited subquery per day, in a union."""
    c = daily_views.c
    parts = [
        select(c.day, c.content_id, c.views)
        .where(c.content_type == content_type, c.day == day, c.views > 0)
        .order_by(desc(c.views))
        .limit(n)
        .subquery()
        for day in days
    ]
    return union_all(*(select(*part.c) for part in parts))


class HistoryReader:
    """Queries of the history: days of given contents, and the most viewed of a period."""

    def __init__(self, engine: AsyncEngine) -> None:
        # Each read is one statement (per chunk of ids), which sees one snapshot by itself: in
        # autocommit it needs no BEGIN before it nor ROLLBACK after it, two round trips fewer.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        # PostgreSQL takes a list of ids as one array parameter: the statement's text is the
        # same for any number of ids, so it is compiled and prepared once, not once per length.
        self._arrays = engine.dialect.name == "postgresql"

    def _among(self, content_ids: list[str]) -> Any:
        """``content_id`` is one of ``content_ids``."""
        column = daily_views.c.content_id
        if self._arrays:
            return column == any_(bindparam("ids", content_ids, type_=ARRAY(column.type)))
        return column.in_(content_ids)

    async def rows(
        self,
        content_type: str,
        content_ids: Sequence[str],
        first: date | None,
        last: date | None,
        *,
        sketches_before: date | None,
    ) -> list[HistoryRow]:
        """Every stored day of ``content_ids`` within the period, with the sketches of the days
        before ``sketches_before`` (none when it is ``None``)."""
        c = daily_views.c
        sketches_before = _sketches_needed(first, sketches_before)
        sketch = (
            case((c.day < sketches_before, c.unique_sketch), else_=null())
            if sketches_before is not None
            else None
        )
        sketches = sketch is not None
        columns = [c.content_id, c.day, c.views, c.unique_viewers, c.crawler_views]
        rows: list[HistoryRow] = []
        async with self.engine.connect() as connection:
            for start in range(0, len(content_ids), CHUNK_ROWS):
                chunk = list(content_ids[start : start + CHUNK_ROWS])
                query = select(*columns, *([sketch] if sketch is not None else [])).where(
                    c.content_type == content_type,
                    self._among(chunk),
                    _in_period(first, last),
                )
                for row in await connection.execute(query):
                    rows.append(
                        HistoryRow(
                            row[0],
                            row[1],
                            int(row[2]),
                            None if row[3] is None else int(row[3]),
                            int(row[4]),
                            bytes(row[5]) if sketches and row[5] is not None else None,
                        )
                    )
        return rows

    async def totals(
        self,
        content_type: str,
        content_ids: Sequence[str],
        first: date | None,
        last: date | None,
        *,
        sketches_before: date | None,
    ) -> list[HistoryRow]:
        """The period of each of ``content_ids`` summed up in the database: one row per id
        (dated ``date.min``; ``unique_viewers`` is the largest day's), then one row per day
        before ``sketches_before`` that kept a sketch (its sketch alone)."""
        c = daily_views.c
        sketches_before = _sketches_needed(first, sketches_before)
        rows: list[HistoryRow] = []
        async with self.engine.connect() as connection:
            for start in range(0, len(content_ids), CHUNK_ROWS):
                chunk = list(content_ids[start : start + CHUNK_ROWS])
                where = (
                    c.content_type == content_type,
                    self._among(chunk),
                    _in_period(first, last),
                )
                if self._arrays:
                    await self._totals_with_sketches(connection, where, sketches_before, rows)
                    continue
                sums = select(
                    c.content_id,
                    func.sum(c.views),
                    func.max(c.unique_viewers),
                    func.sum(c.crawler_views),
                ).where(*where)
                for content_id, views, uniques, crawlers in await connection.execute(
                    sums.group_by(c.content_id)
                ):
                    rows.append(_summed(content_id, views, uniques, crawlers))
                if sketches_before is None:
                    continue
                kept = select(c.content_id, c.day, c.unique_sketch).where(
                    *where, c.day < sketches_before, c.unique_sketch.is_not(None)
                )
                for content_id, day, sketch in await connection.execute(kept):
                    rows.append(HistoryRow(content_id, day, 0, None, 0, bytes(sketch)))
        return rows

    @staticmethod
    async def _totals_with_sketches(
        connection: Any,
        where: tuple[Any, ...],
        sketches_before: date | None,
        rows: list[HistoryRow],
    ) -> None:
        """:meth:`totals` in one statement and one pass over the rows (PostgreSQL): the sums,
        and the kept days' sketches gathered into arrays per id."""
        c = daily_views.c
        columns = [
            c.content_id,
            func.sum(c.views),
            func.max(c.unique_viewers),
            func.sum(c.crawler_views),
        ]
        if sketches_before is not None:
            kept = and_(c.day < sketches_before, c.unique_sketch.is_not(None))
            columns += [
                func.array_agg(c.day).filter(kept),
                func.array_agg(c.unique_sketch).filter(kept),
            ]
        query = select(*columns).where(*where).group_by(c.content_id)
        for row in await connection.execute(query):
            rows.append(_summed(row[0], row[1], row[2], row[3]))
            if sketches_before is not None and row[4] is not None:
                rows += (
                    HistoryRow(row[0], day, 0, None, 0, bytes(sketch))
                    for day, sketch in zip(row[4], row[5], strict=True)
                )

    async def top(
        self, content_type: str, first: date | None, last: date | None, n: int
    ) -> list[tuple[str, int]]:
        """The ``n`` ids with the most views in the period, most first, ties by id."""
        c = daily_views.c
        total = func.sum(c.views).label("total")
        query = (
            select(c.content_id, total)
            .where(c.content_type == content_type, _in_period(first, last))
            .group_by(c.content_id)
            .having(func.sum(c.views) > 0)
            .order_by(desc(total), c.content_id)
            .limit(n)
        )
        async with self.engine.connect() as connection:
            return [(row[0], int(row[1])) for row in await connection.execute(query)]

    async def day_leaders(
        self, content_type: str, days: Sequence[date], n: int
    ) -> dict[date, list[tuple[str, int]]]:
        """The ``n`` ids with the most views on each of ``days`` (one index range each, all in
        one statement), most first."""
        leaders: dict[date, list[tuple[str, int]]] = {day: [] for day in days}
        if not days:
            return leaders
        async with self.engine.connect() as connection:
            if self._arrays:
                found = await connection.execute(
                    _DAY_LEADERS, {"days": list(days), "type": content_type, "n": n}
                )
            else:
                found = await connection.execute(_day_leaders_union(content_type, days, n))
            for day, content_id, views in found:
                leaders[day].append((content_id, int(views)))
        for ranked in leaders.values():
            ranked.sort(key=lambda item: -item[1])
        return leaders

    async def sums(
        self, content_type: str, content_ids: Sequence[str], first: date | None, last: date | None
    ) -> dict[str, int]:
        """Views of each of ``content_ids`` in the period (ids without any are left out)."""
        c = daily_views.c
        sums: dict[str, int] = {}
        async with self.engine.connect() as connection:
            for start in range(0, len(content_ids), CHUNK_ROWS):
                query = (
                    select(c.content_id, func.sum(c.views))
                    .where(
                        c.content_type == content_type,
                        self._among(list(content_ids[start : start + CHUNK_ROWS])),
                        _in_period(first, last),
                    )
                    .group_by(c.content_id)
                )
                sums.update((row[0], int(row[1])) for row in await connection.execute(query))
        return sums


def _summed(content_id: str, views: Any, uniques: Any, crawlers: Any) -> HistoryRow:
    """One id's period summed up, as a row dated ``date.min``."""
    return HistoryRow(
        content_id,
        date.min,
        int(views),
        None if uniques is None else int(uniques),
        int(crawlers),
        None,
    )
