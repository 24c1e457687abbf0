"""Mapped tables keyed by BIGINT, INTEGER, SMALLINT, UUID and string ids, over the whole range.

A view is accepted only if its id can be a row of the mapped table; every accepted view reaches
that row at the sync, and every other one is refused at the request (``InvalidKeyError``, which
the middleware answers as ``invalid_id``) and leaves nothing in Redis. Runs on the real Redis
with PostgreSQL and with SQLite.
"""

from __future__ import annotations

import itertools
import re
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import FakeClock
from tests.test_sync import PERMISSIVE
from viewmw import ConfigurationError, InvalidKeyError, KeySchema, Settings, Store, ViewTracker
from viewmw.ids import IdFormat
from viewmw.sync import ViewSync

KEYS = KeySchema()
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BIGINT = (-(2**63), 2**63 - 1)
INTEGER = (-(2**31), 2**31 - 1)
SMALLINT = (-(2**15), 2**15 - 1)

id_tables = MetaData()
TABLES = {
    "big": Table(
        "ids_big",
        id_tables,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("view_count", BigInteger, nullable=False, server_default="0"),
    ),
    "num": Table(
        "ids_int",
        id_tables,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("view_count", BigInteger, nullable=False, server_default="0"),
    ),
    "small": Table(
        "ids_small",
        id_tables,
        Column("id", SmallInteger, primary_key=True, autoincrement=False),
        Column("view_count", Integer, nullable=False, server_default="0"),
    ),
    "uid": Table(
        "ids_uuid",
        id_tables,
        Column("id", Uuid, primary_key=True),
        Column("view_count", BigInteger, nullable=False, server_default="0"),
    ),
    "uid_text": Table(
        "ids_uuid_text",
        id_tables,
        Column("id", Uuid(as_uuid=False), primary_key=True),
        Column("view_count", BigInteger, nullable=False, server_default="0"),
    ),
    "code": Table(
        "ids_code",
        id_tables,
        Column("slug", String(20), primary_key=True),
        Column("views", BigInteger, nullable=False, server_default="0"),
    ),
    "note": Table(
        "ids_text",
        id_tables,
        Column("id", Text, primary_key=True),
        Column("view_count", BigInteger, nullable=False, server_default="0"),
    ),
}
COUNT_COLUMNS = {name: table.c[list(table.c.keys())[1]] for name, table in TABLES.items()}


def holdable(content_type: str, content_id: str, dialect: str) -> bool:
    """The oracle: can ``content_id`` be a row of the type's table? Written apart from viewmw."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", content_id):
        return False
    if content_type in ("big", "num", "small"):
        digits = content_id.removeprefix("-")
        if not digits.isdigit() or str(int(content_id)) != content_id:
            return False
        low, high = {"big": BIGINT, "num": INTEGER, "small": SMALLINT}[content_type]
        if dialect == "sqlite":  # SQLite stores every INTEGER in 8 bytes
            low, high = BIGINT
        return low <= int(content_id) <= high
    if content_type in ("uid", "uid_text"):
        try:
            return str(uuid.UUID(content_id)) == content_id
        except ValueError:
            return False
    if content_type == "code":
        return len(content_id) <= 20
    return True


def db_value(content_type: str, content_id: str) -> object:
    if content_type in ("big", "num", "small"):
        return int(content_id)
    if content_type == "uid":
        return uuid.UUID(content_id)
    return content_id


# Ids near and beyond every boundary, in canonical and other spellings ---------------------------


def integer_ids(low: int, high: int) -> st.SearchStrategy[str]:
    edges = [low, high, low - 1, high + 1, 0, -1, 1, *BIGINT, BIGINT[0] - 1, BIGINT[1] + 1]
    numbers = st.one_of(
        st.sampled_from(edges),
        st.integers(min_value=low, max_value=high),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.integers(min_value=10**18, max_value=10**19),  # 19 digits: Snowflake ids
    )
    return st.one_of(
        numbers.map(str),
        numbers.map(lambda n: "0" + str(abs(n))),  # "07": the same row as "7"
        numbers.map(lambda n: "+" + str(n)),
        st.sampled_from(["-0", "00", "1_0", "1e3", "x", "9" * 64, "9" * 65]),
    )


uuid_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.sampled_from([str(uuid.UUID(int=0)), str(uuid.UUID(int=2**128 - 1)), "not-a-uuid"]),
)
text_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=70)
ID_STRATEGIES = {
    "big": integer_ids(*BIGINT),
    "num": integer_ids(*INTEGER),
    "small": integer_ids(*SMALLINT),
    "uid": uuid_ids,
    "uid_text": uuid_ids,
    "code": text_ids,
    "note": text_ids,
}
offers = st.lists(
    st.sampled_from(sorted(ID_STRATEGIES)).flatmap(
        lambda content_type: st.tuples(st.just(content_type), ID_STRATEGIES[content_type])
    ),
    min_size=1,
    max_size=8,
)


# The harness -----------------------------------------------------------------------------------


async def recreate(engine: AsyncEngine, table_metadata: MetaData) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(table_metadata.drop_all)
        await connection.run_sync(table_metadata.create_all)


@dataclass
class IdWorld:
    redis: aioredis.Redis
    store: Store
    tracker: ViewTracker
    accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    viewers: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def dialect(self) -> str:
        return self.store.dialect

    async def insert_rows(self, contents: list[tuple[str, str]]) -> None:
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        async with self.store.engine.begin() as connection:
            for content_type, content_id in contents:
                table = TABLES[content_type]
                key = table.primary_key.columns.values()[0]
                await connection.execute(
                    insert(table)
                    .values({key.name: db_value(content_type, content_id)})
                    .on_conflict_do_nothing()
                )

    async def offer(self, content_type: str, content_id: str) -> bool:
        """One view by a new viewer; whether it was accepted (it is counted when accepted)."""
        viewer = f"user:{next(self.viewers)}"
        try:
            result = await self.tracker.track_view(content_type, content_id, viewer)
        except InvalidKeyError:
            return False
        assert result.counted, result
        self.accepted[(content_type, content_id)] += 1
        return True

    async def row_count(self, content_type: str, content_id: str) -> int | None:
        table = TABLES[content_type]
        key = table.primary_key.columns.values()[0]
        query = select(COUNT_COLUMNS[content_type]).where(key == db_value(content_type, content_id))
        async with self.store.engine.connect() as connection:
            return (await connection.execute(query)).scalar_one_or_none()  # type: ignore[no-any-return]


@pytest.fixture
async def id_world(
    real_redis: aioredis.Redis, store: Store, clock: FakeClock
) -> AsyncIterator[IdWorld]:
    """Real Redis, and the id tables on PostgreSQL and on SQLite (conftest's ``store``)."""
    await recreate(store.engine, id_tables)
    id_store = Store(store.engine, COUNT_COLUMNS)
    await id_store.create_tables()
    config = Settings(secret="test-secret-0123456789", redis_timeout=5.0, limits=PERMISSIVE)
    tracker = ViewTracker(real_redis, id_store, config, clock=clock)
    yield IdWorld(real_redis, id_store, tracker)
    async with store.engine.begin() as connection:
        await connection.run_sync(id_tables.drop_all)


# Tests ------------------------------------------------------------------------------------------


@EXAMPLES
@given(offered=offers)
async def test_every_accepted_id_reaches_its_row_and_every_other_is_refused_at_once(
    id_world: IdWorld, offered: list[tuple[str, str]]
) -> None:
    world = id_world
    await world.insert_rows([c for c in offered if holdable(*c, world.dialect)])

    for content_type, content_id in offered:
        accepted = await world.offer(content_type, content_id)
        assert accepted == holdable(content_type, content_id, world.dialect), (
            content_type,
            content_id,
        )
        if not accepted and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", content_id):
            pending = KEYS.pending(content_type, content_id)
            assert not await world.redis.exists(pending), "a refused view was counted"

    report = await ViewSync(world.redis, world.store, world.tracker.settings).run()

    assert report.unmatched_views == 0
    assert report.views == sum(1 for c in offered if holdable(*c, world.dialect))
    for content, views in world.accepted.items():
        assert await world.row_count(*content) == views, content
        assert await world.tracker.get_database_view_count(*content) == views, content
    assert await world.store.unmatched_views() == []


async def test_snowflake_ids_and_the_bigint_bounds_are_synced(id_world: IdWorld) -> None:
    """The report's case: 19-digit ids in a BIGINT key were counted, then dropped."""
    world = id_world
    ids = ["1234567890123456789", "9223372036854775807", "-9223372036854775808", "-5"]
    await world.insert_rows([("big", i) for i in ids])
    for content_id in ids:
        assert await world.offer("big", content_id)
    assert not await world.offer("big", "9223372036854775808")
    assert not await world.offer("big", "-9223372036854775809")

    report = await ViewSync(world.redis, world.store, world.tracker.settings).run()

    assert (report.views, report.unmatched_views) == (4, 0)
    assert [await world.row_count("big", i) for i in ids] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("column", "accepted", "refused"),
    [
        (Column("id", BigInteger), ["0", "-5", str(2**63 - 1)], ["05", "-0", str(2**63), "a"]),
        (Column("id", Integer), ["7", str(-(2**31))], [str(2**31), "1234567890123456789"]),
        (Column("id", SmallInteger), ["32767", "-32768"], ["32768", "-32769"]),
        (Column("id", Uuid), [str(uuid.UUID(int=5))], [uuid.UUID(int=5).hex, "A" * 36]),
        (Column("id", String(5)), ["abcde", "a-_1"], ["abcdef"]),
        (Column("id", Text), ["x" * 64], []),
    ],
)
def test_accepts_id_follows_the_declared_column_on_postgresql(
    column: Column[int], accepted: list[str], refused: list[str]
) -> None:
    Table("t", MetaData(), column, Column("n", BigInteger))
    ids = IdFormat.of(column, "postgresql")
    assert [ids.parse(i) is not None for i in accepted] == [True] * len(accepted)
    assert [ids.parse(i) is not None for i in refused] == [False] * len(refused)


def test_sqlite_integer_columns_hold_64_bits() -> None:
    column = Column("id", Integer)
    Table("t", MetaData(), column)
    assert IdFormat.of(column, "sqlite").parse(str(2**63 - 1)) == 2**63 - 1
    assert IdFormat.of(column, "postgresql").parse(str(2**63 - 1)) is None


def test_an_id_column_of_another_type_is_a_configuration_error(sqlite_store: Store) -> None:
    table = Table(
        "prices", MetaData(), Column("id", Numeric, primary_key=True), Column("n", BigInteger)
    )
    with pytest.raises(ConfigurationError, match=r"prices\.id"):
        Store(sqlite_store.engine, {"price": table.c.n})


def test_unmapped_types_accept_every_valid_id(sqlite_store: Store) -> None:
    assert sqlite_store.accepts_id("task", "9" * 64)
    assert sqlite_store.accepts_id("story", str(2**63 - 1))
    assert not sqlite_store.accepts_id("story", str(2**63))


# Tables named in settings (VIEWMW_CONTENT_TABLES) ----------------------------------------------


async def test_tables_named_in_settings_work_with_their_real_key_type(
    store: Store, real_redis: aioredis.Redis, clock: FakeClock
) -> None:
    """The store reads each named table's key type from the database at first use.

    SQLite has no UUID type (SQLAlchemy stores UUIDs there as 32 hex digits), so UUID keys are
    named in settings on PostgreSQL only; in code (``content_tables=``) they work on both.
    """
    await recreate(store.engine, id_tables)
    tables = {"num": "ids_int.view_count", "code": "ids_code.views"}
    if store.dialect == "postgresql":
        tables["uid"] = "ids_uuid.view_count"
    config = Settings(
        secret="test-secret-0123456789",
        redis_timeout=5.0,
        limits=PERMISSIVE,
        database_url=store.engine.url.render_as_string(hide_password=False),
        content_tables=tables,
    )
    named = Store.from_settings(config)
    try:
        assert named.accepts_id("code", "x" * 30)  # not known before the first use

        await named.create_tables()  # the tables exist: nothing created, key types read

        assert named.accepts_id("code", "x" * 20)
        assert not named.accepts_id("code", "x" * 21)
        assert named.accepts_id("num", str(2**31 - 1))
        assert named.accepts_id("num", str(2**31)) == (store.dialect == "sqlite")
        world = IdWorld(real_redis, named, ViewTracker(real_redis, named, config, clock=clock))
        contents = [("num", "2147483647"), ("code", "a-slug_of_20_chars_x")]
        if store.dialect == "postgresql":
            assert not named.accepts_id("uid", uuid.UUID(int=7).hex)
            contents.append(("uid", str(uuid.UUID(int=2**128 - 1))))
        await world.insert_rows(contents)
        for content in contents:
            assert await world.offer(*content)
        assert not await world.offer("code", "x" * 21)

        report = await ViewSync(real_redis, named, config).run()

        assert (report.views, report.unmatched_views) == (len(contents), 0)
        assert [await world.row_count(*c) for c in contents] == [1] * len(contents)
    finally:
        await named.close()
        async with store.engine.begin() as connection:
            await connection.run_sync(id_tables.drop_all)


async def test_a_table_named_in_settings_is_created_with_a_bigint_key(store: Store) -> None:
    config = Settings(
        database_url=store.engine.url.render_as_string(hide_password=False),
        content_tables={"clip": "ids_clips.view_count"},
    )
    named = Store.from_settings(config)
    try:
        await named.create_tables()
        assert named.accepts_id("clip", str(2**63 - 1))
        assert not named.accepts_id("clip", "abc")
        await named.commit_batch("b", datetime.now(UTC), {("clip", "5"): 1})
        assert await named.read_count("clip", "5") == 1  # no row 5: kept as unmatched
    finally:
        async with named.engine.begin() as connection:
            await connection.exec_driver_sql("DROP TABLE ids_clips")
        await named.close()
