"""The SQL side: tables that hold synced counts, the sync ledger, bulk adds and count reads.

Content types map to a count column of the user's own table (``stories.view_count``); any other
type is kept in the generic ``viewmw_view_counts`` table. :data:`metadata` holds viewmw's own
tables so they can go into the user's Alembic migrations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    null,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from viewmw.errors import ConfigurationError, StaleFenceError
from viewmw.settings import Settings

metadata = MetaData()
"""viewmw's own tables (the generic counts and the sync ledger), for migrations."""

view_counts = Table(
    "viewmw_view_counts",
    metadata,
    Column("content_type", String(32), primary_key=True),
    Column("content_id", String(64), primary_key=True),
    Column("view_count", BigInteger, nullable=False, server_default="0"),
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
"""The sync ledger: one row per committed batch; its primary key makes a commit happen once."""

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


def content_table(
    table_metadata: MetaData, name: str, *, count_column: str = "view_count"
) -> Table:
    """Define a minimal content table (``id`` BIGINT primary key, a BIGINT count defaulting to 0).

    For apps that do not have one yet; apps that do pass their own table's column to :class:`Store`.
    """
    return Table(
        name,
        table_metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column(count_column, BigInteger, nullable=False, server_default="0"),
    )


@dataclass(frozen=True, slots=True)
class CountTarget:
    """Where one content type's count lives: a table, its id column and its count column."""

    table: Table
    id_column: Column[Any]
    count_column: Column[Any]
    integer_ids: bool

    @classmethod
    def for_column(cls, content_type: str, column: Column[Any]) -> CountTarget:
        table = column.table
        if not isinstance(table, Table):
            raise ConfigurationError("content_tables", f"{content_type!r}: column has no table")
        keys = list(table.primary_key.columns)
        if len(keys) != 1:
            raise ConfigurationError(
                "content_tables",
                f"{content_type!r}: table {table.name} needs a one-column primary key",
            )
        python_type = _python_type(keys[0])
        return cls(table, keys[0], column, python_type is int)

    def db_id(self, content_id: str) -> int | str | None:
        """The id as the column stores it, or ``None`` if it cannot exist there."""
        if not self.integer_ids:
            return content_id
        return int(content_id) if content_id.isdigit() and len(content_id) <= 18 else None


def _python_type(column: Column[Any]) -> type | None:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


class Store:
    """Counts in SQL: reads for the tracker, bulk adds and the ledger for the sync.

    Args:
        engine: an async SQLAlchemy engine (``postgresql+asyncpg`` or ``sqlite+aiosqlite``).
        content_tables: content type -> the count column of its table, e.g.
            ``{"story": stories.c.view_count}``. Other types use ``viewmw_view_counts``.
    """

    def __init__(
        self, engine: AsyncEngine, content_tables: Mapping[str, Column[Any]] | None = None
    ):
        self.engine = engine
        self._targets = {
            content_type: CountTarget.for_column(content_type, column)
            for content_type, column in (content_tables or {}).items()
        }

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

        Each mapped table is described as ``id`` BIGINT primary key plus the count column; the
        app's real table may have any other columns.
        """
        tables = MetaData()
        columns = {}
        for content_type, target in settings.content_tables.items():
            table_name, count_column = target.split(".")
            columns[content_type] = content_table(tables, table_name, count_column=count_column).c[
                count_column
            ]
        engine_options.setdefault("pool_pre_ping", True)
        return cls.from_url(settings.resolved_database_url(), columns, **engine_options)

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self.engine.dialect.name

    async def create_tables(self) -> None:
        """Create viewmw's tables and the mapped content tables if they do not exist."""
        tables = [*metadata.sorted_tables, *{t.table for t in self._targets.values()}]
        async with self.engine.begin() as connection:
            for table in tables:
                await connection.run_sync(table.create, checkfirst=True)

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self.engine.dispose()

    # Reads --------------------------------------------------------------------------------------

    async def read_counts(
        self, content_type: str, content_ids: Sequence[str], batch_id: str = ""
    ) -> tuple[dict[str, int], bool]:
        """Counts of ``content_ids`` (0 for a missing row), and whether ``batch_id`` is committed.

        Both come from one statement, so from one snapshot of the database: the caller can tell
        whether the counts already include the unsettled batch.
        """
        target = self._targets.get(content_type)
        if target is None:
            rows = select(view_counts.c.content_id, view_counts.c.view_count).where(
                view_counts.c.content_type == content_type,
                view_counts.c.content_id.in_(list(content_ids)),
            )
        else:
            db_ids = [i for i in (target.db_id(c) for c in content_ids) if i is not None]
            rows = select(target.id_column, target.count_column).where(target.id_column.in_(db_ids))
        committed = select(
            null().label("content_id"),
            select(func.count())
            .select_from(sync_batches)
            .where(sync_batches.c.batch_id == batch_id)
            .scalar_subquery(),
        )
        by_row: dict[str, int] = {}
        in_ledger = False
        async with self.engine.connect() as connection:
            for row_id, value in (await connection.execute(union_all(rows, committed))).all():
                if row_id is None:
                    in_ledger = bool(value)
                else:
                    by_row[str(row_id)] = int(value or 0)
        row_of = (lambda c: c) if target is None else (lambda c: str(target.db_id(c)))
        return {c: by_row.get(row_of(c), 0) for c in content_ids}, in_ledger

    async def read_count(self, content_type: str, content_id: str) -> int:
        """The database count of one content (0 when it has no row)."""
        counts, _ = await self.read_counts(content_type, [content_id])
        return counts[content_id]

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
    ) -> bool:
        """Add every delta and record ``batch_id`` in the ledger, in one transaction.

        Returns ``False`` without changing anything if the ledger already holds the batch. Deltas
        of contents whose row does not exist in a mapped table are dropped (their content is gone).
        A ``fence`` (the sync's fencing token) older than one already committed in
        ``fence_scope`` refuses the commit with :class:`~viewmw.errors.StaleFenceError`; ``0``
        skips that check.
        """
        by_type: dict[str, dict[str, int]] = {}
        for (content_type, content_id), delta in deltas.items():
            by_type.setdefault(content_type, {})[content_id] = delta
        try:
            async with self.engine.begin() as connection:
                if fence:
                    await self._check_fence(connection, fence, fence_scope)
                await self._commit(connection, batch_id, started_at, deltas, by_type)
        except _AlreadyCommitted:
            return False
        except IntegrityError:
            # Another sync inserted the same batch id first and committed: the batch is in.
            if await self.is_committed(batch_id):
                return False
            raise
        return True

    async def _commit(
        self,
        connection: AsyncConnection,
        batch_id: str,
        started_at: datetime,
        deltas: Mapping[tuple[str, str], int],
        by_type: dict[str, dict[str, int]],
    ) -> None:
        exists = select(func.count()).where(sync_batches.c.batch_id == batch_id)
        if (await connection.execute(exists)).scalar_one():
            raise _AlreadyCommitted
        await connection.execute(
            sync_batches.insert().values(
                batch_id=batch_id,
                started_at=started_at,
                committed_at=datetime.now(UTC),
                contents=len(deltas),
                views=sum(deltas.values()),
            )
        )
        for content_type, type_deltas in by_type.items():
            await self._add(connection, content_type, type_deltas)

    async def _add(
        self, connection: AsyncConnection, content_type: str, deltas: dict[str, int]
    ) -> None:
        target = self._targets.get(content_type)
        items = list(deltas.items())
        for start in range(0, len(items), CHUNK_ROWS):
            chunk = items[start : start + CHUNK_ROWS]
            if target is None:
                await self._upsert_generic(connection, content_type, chunk)
            else:
                await self._update_mapped(connection, target, chunk)

    async def _upsert_generic(
        self, connection: AsyncConnection, content_type: str, chunk: list[tuple[str, int]]
    ) -> None:
        rows = [{"content_type": content_type, "content_id": i, "view_count": d} for i, d in chunk]
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        statement = insert(view_counts).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=[view_counts.c.content_type, view_counts.c.content_id],
            set_={"view_count": view_counts.c.view_count + statement.excluded.view_count},
        )
        await connection.execute(statement)

    async def _update_mapped(
        self, connection: AsyncConnection, target: CountTarget, chunk: list[tuple[str, int]]
    ) -> None:
        # Ids such as "7" and "07" name the same integer row, and UPDATE … FROM applies one
        # source row per target row: add them up first.
        summed: dict[int | str, int] = {}
        for content_id, delta in chunk:
            db_id = target.db_id(content_id)
            if db_id is not None:
                summed[db_id] = summed.get(db_id, 0) + delta
        pairs = list(summed.items())
        if not pairs:
            return
        table, id_name, count_name = (
            target.table.name,
            target.id_column.name,
            target.count_column.name,
        )
        if self.dialect == "postgresql":
            # One set-based statement per chunk; ids are unique per batch, so no pre-aggregation.
            id_type = "bigint" if target.integer_ids else "text"
            statement = text(
                f'UPDATE "{table}" AS t SET "{count_name}" = t."{count_name}" + d.delta '
                f"FROM unnest(CAST(:ids AS {id_type}[]), CAST(:deltas AS bigint[])) "
                f"AS d(id, delta) "
                f'WHERE t."{id_name}" = d.id'
            ).bindparams(bindparam("ids"), bindparam("deltas"))
            await connection.execute(
                statement, {"ids": [i for i, _ in pairs], "deltas": [d for _, d in pairs]}
            )
        else:
            update = (
                target.table.update()
                .where(target.id_column == bindparam("b_id"))
                .values({count_name: target.count_column + bindparam("b_delta")})
            )
            await connection.execute(update, [{"b_id": i, "b_delta": d} for i, d in pairs])

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


class _AlreadyCommitted(Exception):
    """The ledger holds the batch: roll back and report it."""
