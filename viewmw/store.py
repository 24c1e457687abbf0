"""The SQL side: tables that hold synced counts, the sync ledger, bulk adds and count reads.

Content types map to a count column of the user's own table (``stories.view_count``); any other
type is kept in the generic ``viewmw_view_counts`` table. Views of rows that do not exist in a
mapped table are kept in ``viewmw_unmatched_views`` and reported, never dropped. :data:`metadata`
holds viewmw's own tables so they can go into the user's Alembic migrations.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    case,
    cast,
    func,
    inspect,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from viewmw.errors import ConfigurationError, StaleFenceError
from viewmw.ids import DbId, IdFormat
from viewmw.settings import Settings

metadata = MetaData()
"""viewmw's own tables (the generic counts and the sync ledger), for migrations."""

view_counts = Table(
    "viewmw_view_counts",
    metadata,
    Column("content_type", String(32), primary_key=True),
    Column("content_id", String(64), primary_key=True),
    Column("view_count", BigInteger, nullable=False, server_default="0"),
    # "Most viewed of a type" reads this index in order instead of sorting the table.
    Index("ix_viewmw_view_counts_type_count", "content_type", "view_count"),
)
"""Counts of content types that have no table of their own."""

sync_batches = Table(
    "viewmw_sync_batches",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("committed_at", DateTime(timezone=True), nullable=False),
    Column("contents", Integer, nullable=False),
    Column("views", BigInteger, nullable=False),
)
"""The sync ledger: one row per committed batch; its primary key makes a commit happen once.

``contents`` and ``views`` count the whole batch, unmatched views included."""

unmatched_views = Table(
    "viewmw_unmatched_views",
    metadata,
    Column("content_type", String(32), primary_key=True),
    Column("content_id", String(64), primary_key=True),
    Column("view_count", BigInteger, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)
"""Views the sync could not add because their row does not exist in the mapped table (or the
id cannot be a row there): kept, added up across syncs, until :meth:`Store.retry_unmatched`
moves them into rows that exist by then."""

daily_views = Table(
    "viewmw_daily_views",
    metadata,
    Column("content_type", String(32), nullable=False),
    Column("content_id", String(64), nullable=False),
    Column("day", Date, nullable=False),
    Column("views", BigInteger, nullable=False, server_default="0"),
    Column("unique_viewers", BigInteger, nullable=True),
    Column("crawler_views", BigInteger, nullable=False, server_default="0"),
    Column("unique_sketch", LargeBinary, nullable=True),
    # The syncs write a day's rows together, so one content's days lie on as many heap pages:
    # on PostgreSQL the primary key carries the counts, and a period's sums read its range
    # alone (an index-only scan), not a page per day. It cost the sync's commit nothing
    # measurable (an update of ``views`` was never HOT anyway: the index below holds it; one
    # that changes only the other counts no longer is), where a second index with them cost a
    # seventh more. The sketches stay in the heap.
    # A table created before keeps its plain key (see create_tables).
    PrimaryKeyConstraint(
        "content_type",
        "content_id",
        "day",
        postgresql_include=["views", "crawler_views", "unique_viewers"],
    ),
    # "Most viewed of a type on a day" reads the head of this index: the ranking of a period
    # starts from each of its days' leaders (see docs/history.md).
    Index(
        "ix_viewmw_daily_views_type_day_views",
        "content_type",
        "day",
        "views",
        postgresql_include=["content_id"],
    ),
)
"""The per-day history: views counted per content per calendar day (configured zone), the
day's distinct viewers (a HyperLogLog estimate and its serialized sketch, so that days merge),
and crawler views, which are never part of ``views``. Written by the sync in the same transaction
as the totals."""

sync_fence = Table(
    "viewmw_sync_fence",
    metadata,
    Column("scope", String(64), primary_key=True),
    Column("fence", BigInteger, nullable=False),
)
"""Per scope (the Redis key prefix: apps sharing a database each have their own fences), the
newest sync fence a commit carried. An older one is refused."""

# Rows per statement for bulk adds and reads: large enough to amortise round trips, small enough
# to stay far below the drivers' parameter limits.
CHUNK_ROWS = 5000
# History rows per statement: seven values each, below the drivers' 32 767 parameters.
_DAY_CHUNK_ROWS = 4000
# On PostgreSQL the rows travel as one parameter per column, with no such bound.
_DAY_CHUNK_ROWS_POSTGRESQL = 50_000
# Rows per statement of the set-based update of a mapped table on PostgreSQL (same reason).
_CHUNK_ROWS_POSTGRESQL = 50_000
_DAY_COLUMNS = (
    "content_type",
    "content_id",
    "day",
    "views",
    "crawler_views",
    "unique_viewers",
    "unique_sketch",
)
# Upsert a chunk of history rows from arrays: one statement, no per-row SQL to build. Within a
# chunk a (content, day) appears once (the batch's days are summed per content and day).
# Every column but the sketches travels as one comma-separated text that the server splits
# (names, days and numbers hold no comma; an empty field is NULL): the driver then encodes one
# string instead of a million array elements, and the server parses text as fast as it decodes
# binary arrays. The sketches' array may be shorter than the others: unnest() pads it with NULL.
_ADD_DAYS_POSTGRESQL = text(
    "INSERT INTO viewmw_daily_views AS kept "
    "(content_type, content_id, day, views, crawler_views, unique_viewers, unique_sketch) "
    "SELECT * FROM unnest(string_to_array(:content_type, ','), "
    "string_to_array(:content_id, ','), CAST(string_to_array(:day, ',') AS date[]), "
    "CAST(string_to_array(:views, ',') AS bigint[]), "
    "CAST(string_to_array(:crawler_views, ',') AS bigint[]), "
    "CAST(string_to_array(:unique_viewers, ',', '') AS bigint[]), "
    "CAST(:unique_sketch AS bytea[])) "
    "ON CONFLICT (content_type, content_id, day) DO UPDATE SET "
    "views = kept.views + excluded.views, "
    "crawler_views = kept.crawler_views + excluded.crawler_views, "
    "unique_viewers = CASE WHEN excluded.unique_viewers IS NOT NULL AND (kept.unique_viewers "
    "IS NULL OR excluded.unique_viewers > kept.unique_viewers) THEN excluded.unique_viewers "
    "ELSE kept.unique_viewers END, "
    "unique_sketch = CASE WHEN excluded.unique_viewers IS NOT NULL AND (kept.unique_viewers "
    "IS NULL OR excluded.unique_viewers > kept.unique_viewers) THEN excluded.unique_sketch "
    "ELSE kept.unique_sketch END"
).bindparams(*(bindparam(name) for name in _DAY_COLUMNS))


@dataclass(frozen=True, slots=True)
class DayDelta:
    """What one sync batch adds to one content's day in the history.

    ``views`` and ``crawler_views`` are added; ``unique_viewers`` (with its ``sketch``) replaces
    the stored estimate only when it is larger (the day's HyperLogLog only grows), and ``None``
    leaves it as it is.
    """

    content_type: str
    content_id: str
    day: date
    views: int
    crawler_views: int = 0
    unique_viewers: int | None = None
    sketch: bytes | None = None


def content_table(
    table_metadata: MetaData, name: str, *, count_column: str = "view_count"
) -> Table:
    """Define a minimal content table (``id`` BIGINT primary key, a BIGINT count defaulting to 0,
    indexed so "most viewed" queries need no sort).

    For apps that do not have one yet; apps that do pass their own table's column to :class:`Store`.
    """
    return Table(
        name,
        table_metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column(count_column, BigInteger, nullable=False, server_default="0", index=True),
    )


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`Store.commit_batch` did.

    True when this call committed the batch; false when the ledger already held it (then nothing
    changed and ``unmatched`` is empty).

    Attributes:
        committed: whether this call committed the batch.
        unmatched: (type, id) -> views of the batch whose row does not exist in the mapped table;
            they were added to ``viewmw_unmatched_views`` in the same transaction.
    """

    committed: bool
    unmatched: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.committed

    @property
    def unmatched_views(self) -> int:
        """How many views went to ``viewmw_unmatched_views``."""
        return sum(self.unmatched.values())


@dataclass(frozen=True, slots=True)
class UnmatchedViews:
    """Views kept for one content whose row did not exist when the sync added them."""

    content_type: str
    content_id: str
    view_count: int
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class CountTarget:
    """Where one content type's count lives: a table, its id column and its count column."""

    table: Table
    id_column: Column[Any]
    count_column: Column[Any]
    ids: IdFormat

    @classmethod
    def for_column(cls, content_type: str, column: Column[Any], dialect: str) -> CountTarget:
        table = column.table
        if not isinstance(table, Table):
            raise ConfigurationError("content_tables", f"{content_type!r}: column has no table")
        keys = list(table.primary_key.columns)
        if len(keys) != 1:
            raise ConfigurationError(
                "content_tables",
                f"{content_type!r}: table {table.name} needs a one-column primary key",
            )
        ids = IdFormat.of(keys[0], dialect, content_type=content_type)
        return cls(table, keys[0], column, ids)

    def db_id(self, content_id: str) -> DbId | None:
        """The id as the column stores it, or ``None`` if no row can have it."""
        return self.ids.parse(content_id)


class Store:
    """Counts in SQL: reads for the tracker, bulk adds and the ledger for the sync.

    Args:
        engine: an async SQLAlchemy engine (``postgresql+asyncpg`` or ``sqlite+aiosqlite``).
        content_tables: content type -> the count column of its table, e.g.
            ``{"story": stories.c.view_count}``. The table's one-column primary key (integer,
            string or UUID) is the content id. Other types use ``viewmw_view_counts``.
    """

    def __init__(
        self, engine: AsyncEngine, content_tables: Mapping[str, Column[Any]] | None = None
    ):
        self.engine = engine
        self._targets = {
            content_type: CountTarget.for_column(content_type, column, self.dialect)
            for content_type, column in (content_tables or {}).items()
        }
        # Types whose table was only named (``VIEWMW_CONTENT_TABLES``): the key's real type is
        # read from the database at first use (see _reflect).
        self._described: dict[str, tuple[str, str]] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        content_tables: Mapping[str, Column[Any]] | None = None,
        **engine_options: Any,
    ) -> Store:
        """A store on a new engine for ``url`` (see :attr:`viewmw.Settings.database_url`)."""
        return cls(create_async_engine(url, **engine_options), content_tables)

    @classmethod
    def from_settings(cls, settings: Settings, **engine_options: Any) -> Store:
        """A store for ``settings.database_url`` and ``settings.content_tables``.

        A mapped table that does not exist yet is created by :meth:`create_tables` as
        :func:`content_table` describes it (``id`` BIGINT). Of a table that exists, the store
        reads the primary key's real type from the database at first use (``create_tables``,
        the first count read or the first sync), so integer, string and UUID keys all work;
        until then every valid id is accepted.
        """
        tables = MetaData()
        columns = {}
        for content_type, target in settings.content_tables.items():
            table_name, count_column = target.split(".")
            columns[content_type] = content_table(tables, table_name, count_column=count_column).c[
                count_column
            ]
        engine_options.setdefault("pool_pre_ping", True)
        store = cls.from_url(settings.resolved_database_url(), columns, **engine_options)
        store._described = {
            content_type: (target.split(".")[0], target.split(".")[1])
            for content_type, target in settings.content_tables.items()
        }
        return store

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self.engine.dialect.name

    def accepts_id(self, content_type: str, content_id: str) -> bool:
        """Whether a view of ``content_id`` can reach the database (pure Python, no SQL).

        False when ``content_type`` maps to a table whose primary key cannot hold the id: an
        integer out of the column's range or not in canonical decimal (``"07"``), a UUID not in
        canonical lowercase text with hyphens, a string longer than the column. ``content_id``
        must have passed :func:`viewmw.keys.validate_content_id`.
        """
        target = self._targets.get(content_type)
        if target is None or content_type in self._described:
            return True
        return target.db_id(content_id) is not None

    async def create_tables(self) -> None:
        """Create viewmw's tables and the mapped content tables if they do not exist.

        Indexes: viewmw's own tables get any index they lack (an index a newer version added);
        a mapped table gets the indexes it declares (:func:`content_table` indexes its count
        column) when it is created here. Tables of the app's own are never altered. A primary
        key is never rebuilt: a history table created by an earlier version keeps a key without
        the counts (reads stay exact, a period's sums read a heap page per day); rebuilding it
        locks the table for as long as the new index takes to build, a step for a maintenance
        window, not for start-up.
        """
        content = dict.fromkeys(target.table for target in self._targets.values())
        async with self.engine.begin() as connection:
            for table in metadata.sorted_tables:
                await connection.run_sync(table.create, checkfirst=True)
                for index in table.indexes:
                    await connection.run_sync(index.create, checkfirst=True)
            for table in content:
                await connection.run_sync(table.create, checkfirst=True)
        await self._reflect()

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self.engine.dispose()

    async def _reflect(self) -> None:
        """Read the primary key type of described tables that exist (once each)."""
        if not self._described:
            return
        async with self.engine.connect() as connection:
            columns = await connection.run_sync(_reflect_count_columns, dict(self._described))
        for content_type, column in columns.items():
            self._targets[content_type] = CountTarget.for_column(content_type, column, self.dialect)
            self._described.pop(content_type, None)

    # Reads --------------------------------------------------------------------------------------

    async def read_counts(
        self, content_type: str, content_ids: Sequence[str], batch_id: str = ""
    ) -> tuple[dict[str, int], bool]:
        """Counts of ``content_ids`` (0 for a missing row), and whether ``batch_id`` is committed.

        A count includes the content's unmatched views (kept while its row did not exist), so
        it is every view synced for the id, and moving them into the row changes nothing here.
        Everything comes from one statement, so from one snapshot of the database: the caller
        can tell whether the counts already include the unsettled batch.
        """
        batches = {batch_id} if batch_id else set()
        counts, committed = await self.read_counts_and_batches(content_type, content_ids, batches)
        return counts, bool(committed)

    async def read_counts_and_batches(
        self, content_type: str, content_ids: Sequence[str], batch_ids: Collection[str]
    ) -> tuple[dict[str, int], set[str]]:
        """As :meth:`read_counts`, for the unsettled batches of several content shards (a Redis
        Cluster's): the counts, and which of ``batch_ids`` are committed, from one snapshot."""
        if self._described:  # the request path: no coroutine when there is nothing to read
            await self._reflect()
        target = self._targets.get(content_type)
        ids = list(content_ids)
        if target is None:
            rows = select(
                literal_column("0"), view_counts.c.content_id, view_counts.c.view_count
            ).where(view_counts.c.content_type == content_type, view_counts.c.content_id.in_(ids))
        else:
            db_ids = [i for i in (target.db_id(c) for c in ids) if i is not None]
            rows = select(
                literal_column("0"), cast(target.id_column, String), target.count_column
            ).where(target.id_column.in_(db_ids))
        kept = select(
            literal_column("1"), unmatched_views.c.content_id, unmatched_views.c.view_count
        ).where(
            unmatched_views.c.content_type == content_type, unmatched_views.c.content_id.in_(ids)
        )
        committed = select(literal_column("2"), sync_batches.c.batch_id, literal_column("0")).where(
            sync_batches.c.batch_id.in_(list(batch_ids))
        )
        counts = dict.fromkeys(ids, 0)
        in_ledger: set[str] = set()
        statement = union_all(rows, kept, committed) if batch_ids else union_all(rows, kept)
        async with self.engine.connect() as connection:
            result = await connection.execute(statement)
            for part, row_id, value in result.all():
                if part == 2:
                    in_ledger.add(row_id)
                    continue
                content_id = row_id if part == 1 or target is None else target.ids.text(row_id)
                if content_id in counts:
                    counts[content_id] += int(value or 0)
        return counts, in_ledger

    async def read_count(self, content_type: str, content_id: str) -> int:
        """The database count of one content (0 when it has no row)."""
        counts, _ = await self.read_counts(content_type, [content_id])
        return counts[content_id]

    async def unmatched_views(
        self, content_type: str | None = None, *, limit: int | None = None
    ) -> list[UnmatchedViews]:
        """Views kept because their row did not exist, most views first."""
        query = select(unmatched_views).order_by(
            unmatched_views.c.view_count.desc(),
            unmatched_views.c.content_type,
            unmatched_views.c.content_id,
        )
        if content_type is not None:
            query = query.where(unmatched_views.c.content_type == content_type)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as connection:
            return [UnmatchedViews(**row._mapping) for row in await connection.execute(query)]

    async def unmatched_totals(self) -> tuple[int, int]:
        """How many contents have unmatched views, and how many views that is in all."""
        query = select(func.count(), func.coalesce(func.sum(unmatched_views.c.view_count), 0))
        async with self.engine.connect() as connection:
            contents, views = (await connection.execute(query)).one()
        return int(contents), int(views)

    # The sync's side ----------------------------------------------------------------------------

    async def is_committed(self, batch_id: str) -> bool:
        """Whether the ledger holds ``batch_id``."""
        async with self.engine.connect() as connection:
            query = select(func.count()).where(sync_batches.c.batch_id == batch_id)
            return bool((await connection.execute(query)).scalar_one())

    async def commit_batch(
        self,
        batch_id: str,
        started_at: datetime,
        deltas: Mapping[tuple[str, str], int],
        *,
        fence: int = 0,
        fence_scope: str = "",
        days: Sequence[DayDelta] | AsyncIterable[Sequence[DayDelta]] = (),
    ) -> CommitResult:
        """Add every delta and record ``batch_id`` in the ledger, in one transaction.

        ``days`` go into the per-day history (``viewmw_daily_views``) in the same transaction:
        rows, or chunks of rows that are still being made (taken one by one after the totals are
        added; a failure to make one rolls the transaction back).

        Returns a false result without changing anything if the ledger already holds the batch.
        Deltas of contents whose row does not exist in a mapped table are added to
        ``viewmw_unmatched_views`` in the same transaction and returned in the result.
        A ``fence`` (the sync's fencing token) older than one already committed in
        ``fence_scope`` refuses the commit with :class:`~viewmw.errors.StaleFenceError`; ``0``
        skips that check.
        """
        await self._reflect()
        by_type: dict[str, dict[str, int]] = {}
        for (content_type, content_id), delta in deltas.items():
            by_type.setdefault(content_type, {})[content_id] = delta
        try:
            async with self.engine.begin() as connection:
                if fence:
                    await self._check_fence(connection, fence, fence_scope)
                unmatched = await self._commit(connection, batch_id, started_at, deltas, by_type)
                if isinstance(days, AsyncIterable):
                    async for chunk in days:
                        await self._add_days(connection, chunk)
                else:
                    await self._add_days(connection, days)
        except _AlreadyCommitted:
            return CommitResult(False)
        except IntegrityError:
            # Another sync inserted the same batch id first and committed: the batch is in.
            if await self.is_committed(batch_id):
                return CommitResult(False)
            raise
        return CommitResult(True, unmatched)

    async def _commit(
        self,
        connection: AsyncConnection,
        batch_id: str,
        started_at: datetime,
        deltas: Mapping[tuple[str, str], int],
        by_type: dict[str, dict[str, int]],
    ) -> dict[tuple[str, str], int]:
        exists = select(func.count()).where(sync_batches.c.batch_id == batch_id)
        if (await connection.execute(exists)).scalar_one():
            raise _AlreadyCommitted
        now = datetime.now(UTC)
        await connection.execute(
            sync_batches.insert().values(
                batch_id=batch_id,
                started_at=started_at,
                committed_at=now,
                contents=len(deltas),
                views=sum(deltas.values()),
            )
        )
        unmatched: dict[tuple[str, str], int] = {}
        for content_type, type_deltas in by_type.items():
            for content_id in await self._add(connection, content_type, type_deltas):
                unmatched[(content_type, content_id)] = type_deltas[content_id]
        await self._keep_unmatched(
            connection,
            [
                _unmatched_row(content_type, content_id, views, now, now)
                for (content_type, content_id), views in unmatched.items()
            ],
        )
        return unmatched

    async def _add(
        self, connection: AsyncConnection, content_type: str, deltas: dict[str, int]
    ) -> list[str]:
        """Add ``deltas`` to the type's counts; returns the ids whose row does not exist."""
        target = self._targets.get(content_type)
        items = list(deltas.items())
        missing: list[str] = []
        size = CHUNK_ROWS
        if target is not None and self.dialect == "postgresql":
            size = _CHUNK_ROWS_POSTGRESQL
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            if target is None:
                await self._upsert_generic(connection, content_type, chunk)
            else:
                missing += await self._update_mapped(connection, target, chunk)
        return missing

    async def _add_days(self, connection: AsyncConnection, days: Sequence[DayDelta]) -> None:
        """Add per-day amounts to the history (one upsert per chunk of rows)."""
        ordered = sorted(days, key=attrgetter("content_type", "content_id", "day"))
        if self.dialect == "postgresql":
            # Straight into the statement's columns: no per-row dict for a million rows.
            for start in range(0, len(ordered), _DAY_CHUNK_ROWS_POSTGRESQL):
                chunk = ordered[start : start + _DAY_CHUNK_ROWS_POSTGRESQL]
                sketches = [d.sketch for d in chunk]
                while sketches and sketches[-1] is None:
                    sketches.pop()
                await connection.execute(
                    _ADD_DAYS_POSTGRESQL,
                    {
                        "content_type": ",".join([d.content_type for d in chunk]),
                        "content_id": ",".join([d.content_id for d in chunk]),
                        "day": ",".join([d.day.isoformat() for d in chunk]),
                        "views": ",".join([str(d.views) for d in chunk]),
                        "crawler_views": ",".join([str(d.crawler_views) for d in chunk]),
                        "unique_viewers": ",".join([_field(d.unique_viewers) for d in chunk]),
                        "unique_sketch": sketches,
                    },
                )
            return
        rows = [
            {
                "content_type": d.content_type,
                "content_id": d.content_id,
                "day": d.day,
                "views": d.views,
                "crawler_views": d.crawler_views,
                "unique_viewers": d.unique_viewers,
                "unique_sketch": d.sketch,
            }
            for d in ordered
        ]
        for start in range(0, len(rows), _DAY_CHUNK_ROWS):
            statement = self._insert(daily_views).values(rows[start : start + _DAY_CHUNK_ROWS])
            new, kept = statement.excluded, daily_views.c
            # The day's HyperLogLog only grows: the larger estimate (and its sketch) stays.
            larger = new.unique_viewers.is_not(None) & (
                kept.unique_viewers.is_(None) | (new.unique_viewers > kept.unique_viewers)
            )
            statement = statement.on_conflict_do_update(
                index_elements=[kept.content_type, kept.content_id, kept.day],
                set_={
                    "views": kept.views + new.views,
                    "crawler_views": kept.crawler_views + new.crawler_views,
                    "unique_viewers": case((larger, new.unique_viewers), else_=kept.unique_viewers),
                    "unique_sketch": case((larger, new.unique_sketch), else_=kept.unique_sketch),
                },
            )
            await connection.execute(statement)

    def _insert(self, table: Table) -> Any:
        """An INSERT of the engine's dialect (both have ON CONFLICT … DO UPDATE)."""
        return (pg_insert if self.dialect == "postgresql" else sqlite_insert)(table)

    async def _upsert_generic(
        self, connection: AsyncConnection, content_type: str, chunk: list[tuple[str, int]]
    ) -> None:
        rows = [{"content_type": content_type, "content_id": i, "view_count": d} for i, d in chunk]
        statement = self._insert(view_counts).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=[view_counts.c.content_type, view_counts.c.content_id],
            set_={"view_count": view_counts.c.view_count + statement.excluded.view_count},
        )
        await connection.execute(statement)

    async def _update_mapped(
        self, connection: AsyncConnection, target: CountTarget, chunk: list[tuple[str, int]]
    ) -> list[str]:
        """Add one chunk to existing rows; returns the ids that have no row.

        Accepted ids have one spelling each (see :mod:`viewmw.ids`), so ids are unique per
        chunk, as ``UPDATE … FROM`` needs (it applies one source row per target row).
        """
        if self.dialect == "postgresql":
            # An accepted id's text is its column's canonical text (see viewmw.ids).
            accepted = [(c, d) for c, d in chunk if target.db_id(c) is not None]
            missing = await self._update_mapped_postgresql(connection, target, accepted)
            if len(accepted) < len(chunk):  # ids that no row of the column can have
                missing |= {c for c, _ in chunk}.difference(c for c, _ in accepted)
            if not missing:
                return []
            return [content_id for content_id, _ in chunk if content_id in missing]
        pairs = [(db_id, d) for c, d in chunk if (db_id := target.db_id(c)) is not None]
        found: set[str] = set()
        if pairs:
            # SQLite takes the database's write lock at the ledger insert, so no row can appear
            # or go between this read and the update.
            existing = select(target.id_column).where(target.id_column.in_([i for i, _ in pairs]))
            found = {target.ids.text(i) for i in (await connection.execute(existing)).scalars()}
            update = (
                target.table.update()
                .where(target.id_column == bindparam("b_id"))
                .values({target.count_column.name: target.count_column + bindparam("b_delta")})
            )
            present = [{"b_id": i, "b_delta": d} for i, d in pairs if target.ids.text(i) in found]
            if present:
                await connection.execute(update, present)
        return [content_id for content_id, _ in chunk if content_id not in found]

    async def _update_mapped_postgresql(
        self, connection: AsyncConnection, target: CountTarget, pairs: list[tuple[str, int]]
    ) -> set[str]:
        """One set-based statement per chunk of (content id, delta); returns the ids that have
        no row. Ids and deltas travel as comma-separated text (as the history rows do): accepted
        ids hold no comma. The server finds the ids it did not update itself: only those come
        back, not a row per id."""
        if not pairs:
            return set()
        quote = self.engine.dialect.identifier_preparer.quote
        table = self.engine.dialect.identifier_preparer.format_table(target.table)
        id_name, count_name = quote(target.id_column.name), quote(target.count_column.name)
        statement = text(
            f"WITH d AS MATERIALIZED (SELECT * FROM unnest(string_to_array(:ids, ','), "
            f"CAST(string_to_array(:ids, ',') AS {target.ids.sql_type}[]), "
            f"CAST(string_to_array(:deltas, ',') AS bigint[])) AS d(name, id, delta)), "
            f"u AS (UPDATE {table} AS t SET {count_name} = t.{count_name} + d.delta FROM d "
            f"WHERE t.{id_name} = d.id RETURNING t.{id_name} AS id) "
            f"SELECT d.name FROM d WHERE NOT EXISTS (SELECT FROM u WHERE u.id = d.id)"
        ).bindparams(bindparam("ids"), bindparam("deltas"))
        result = await connection.execute(
            statement,
            {
                "ids": ",".join([content_id for content_id, _ in pairs]),
                "deltas": ",".join([str(d) for _, d in pairs]),
            },
        )
        return set(result.scalars())

    async def _keep_unmatched(
        self, connection: AsyncConnection, rows: list[dict[str, Any]]
    ) -> None:
        """Add views to ``viewmw_unmatched_views`` (added up with what is kept already)."""
        for start in range(0, len(rows), CHUNK_ROWS):
            statement = self._insert(unmatched_views).values(rows[start : start + CHUNK_ROWS])
            new, kept = statement.excluded, unmatched_views.c
            statement = statement.on_conflict_do_update(
                index_elements=[kept.content_type, kept.content_id],
                set_={
                    "view_count": kept.view_count + new.view_count,
                    "first_seen": case(
                        (new.first_seen < kept.first_seen, new.first_seen), else_=kept.first_seen
                    ),
                    "last_seen": case(
                        (new.last_seen > kept.last_seen, new.last_seen), else_=kept.last_seen
                    ),
                },
            )
            await connection.execute(statement)

    async def retry_unmatched(self) -> dict[tuple[str, str], int]:
        """Add kept unmatched views to the rows that exist now; returns what moved.

        One transaction takes every kept entry, adds those whose row exists (or whose type now
        has no table of its own) and keeps the rest. Counts read through :meth:`read_counts` do
        not change: they included the kept views already.
        """
        await self._reflect()
        async with self.engine.begin() as connection:
            taken = [
                dict(row._mapping)
                for row in await connection.execute(
                    unmatched_views.delete().returning(*unmatched_views.c)
                )
            ]
            by_type: dict[str, dict[str, int]] = {}
            for row in taken:
                by_type.setdefault(row["content_type"], {})[row["content_id"]] = row["view_count"]
            missing: set[tuple[str, str]] = set()
            for content_type, deltas in by_type.items():
                missing.update(
                    (content_type, content_id)
                    for content_id in await self._add(connection, content_type, deltas)
                )
            await self._keep_unmatched(
                connection,
                [row for row in taken if (row["content_type"], row["content_id"]) in missing],
            )
        return {
            (row["content_type"], row["content_id"]): row["view_count"]
            for row in taken
            if (row["content_type"], row["content_id"]) not in missing
        }

    async def _check_fence(self, connection: AsyncConnection, fence: int, scope: str) -> None:
        # One conditional update: it locks the row until the commit ends, so of two commits
        # racing with different fences, the older one sees the newer one's fence and is refused.
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        await connection.execute(
            insert(sync_fence)
            .values(scope=scope, fence=0)
            .on_conflict_do_nothing(index_elements=["scope"])
        )
        moved = await connection.execute(
            sync_fence.update()
            .where(sync_fence.c.scope == scope, sync_fence.c.fence <= fence)
            .values(fence=fence)
        )
        if moved.rowcount == 0:
            raise StaleFenceError(
                f"sync fence {fence} is stale: a sync that took the lock later has committed"
            )

    def destinations(self) -> dict[str, str]:
        """Content type -> ``"table.count_column"`` of every mapped type (others are generic)."""
        return {
            content_type: f"{target.table.name}.{target.count_column.name}"
            for content_type, target in self._targets.items()
        }

    async def read_fence(self, scope: str = "") -> int:
        """The newest sync fence a commit in ``scope`` carried (0 before the first one)."""
        async with self.engine.connect() as connection:
            query = select(sync_fence.c.fence).where(sync_fence.c.scope == scope)
            value = await connection.scalar(query)
        return int(value or 0)

    async def last_batches(self, limit: int = 10) -> list[dict[str, Any]]:
        """The most recently committed batches, newest first."""
        query = sync_batches.select().order_by(sync_batches.c.committed_at.desc()).limit(limit)
        async with self.engine.connect() as connection:
            return [dict(row._mapping) for row in await connection.execute(query)]


def _field(value: int | None) -> str:
    """A nullable number as a field of a comma-separated column (empty for NULL)."""
    return "" if value is None else str(value)


class _AlreadyCommitted(Exception):
    """The ledger holds the batch: roll back and report it."""


def _unmatched_row(
    content_type: str, content_id: str, views: int, first_seen: datetime, last_seen: datetime
) -> dict[str, Any]:
    return {
        "content_type": content_type,
        "content_id": content_id,
        "view_count": views,
        "first_seen": first_seen,
        "last_seen": last_seen,
    }


def _reflect_count_columns(
    connection: Connection, described: dict[str, tuple[str, str]]
) -> dict[str, Column[Any]]:
    """The count columns of the described tables that exist, with their real key types."""
    inspector = inspect(connection)
    columns: dict[str, Column[Any]] = {}
    for content_type, (table_name, count_name) in described.items():
        if not inspector.has_table(table_name):
            continue  # create_tables creates it as described, or the first use names it
        key = inspector.get_pk_constraint(table_name)["constrained_columns"]
        types = {column["name"]: column["type"] for column in inspector.get_columns(table_name)}
        if len(key) != 1 or count_name not in types:
            raise ConfigurationError(
                "content_tables",
                f"{content_type!r}: table {table_name} needs a one-column primary key and a "
                f"{count_name} column",
            )
        table = Table(
            table_name,
            MetaData(),
            Column(key[0], types[key[0]], primary_key=True, autoincrement=False),
            *([Column(count_name, types[count_name])] if count_name != key[0] else []),
        )
        columns[content_type] = table.c[count_name]
    return columns
