"""Fixtures for real Redis and PostgreSQL, plus fakeredis and SQLite as extra backends.

A server the tests cannot reach fails the test with a message that says how to start it. The
report's header names the servers the run uses (see tests/servers.py), and its summary names the
optional backends whose tests did not run, with how to run them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import fakeredis
import hypothesis
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from sqlalchemy import MetaData, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests import support
from tests.cluster_support import ClusterError, LocalCluster, local_cluster
from tests.servers import named_servers, plan
from tests.support import (
    AMQP_URL,
    HOW_TO_START_POSTGRES,
    HOW_TO_START_REDIS,
    HYPOTHESIS_PROFILE,
    THOROUGH_FACTOR,
    FakeClock,
)
from viewmw import Settings, Store, ViewTracker, content_table
from viewmw import metadata as viewmw_metadata

# `HYPOTHESIS_PROFILE=thorough pytest`: ten times hypothesis' default examples (properties that
# set their own take tests.support.examples(n)), no per-example deadline.
hypothesis.settings.register_profile(
    "thorough", max_examples=100 * THOROUGH_FACTOR, deadline=None, print_blob=True
)
hypothesis.settings.load_profile(HYPOTHESIS_PROFILE)

content_metadata = MetaData()
stories = content_table(content_metadata, "stories")
fantasies = content_table(content_metadata, "fantasies")
CONTENT_TABLES = {"story": stories.c.view_count, "fantasy": fantasies.c.view_count}

_reachable: dict[str, str | None] = {}

# Markers of tests that need a backend the default run does not have, and how to run them.
OPTIONAL_BACKENDS = {
    "rabbitmq": f"RabbitMQ at {AMQP_URL} (VIEWMW_TEST_AMQP_URL): run them with "
    "`nox -s tests-rabbitmq` or `pytest -m rabbitmq`",
    "browser": "headless Chromium (`apt-get install chromium`): run them with "
    "`nox -s tests-browser` or `pytest -m browser`",
    "soak": "minutes of traffic on a local Redis Cluster with web and Dramatiq workers: run it "
    "with `nox -s soak` or `pytest -m soak tests/soak`",
}
_not_run: dict[str, int] = dict.fromkeys(OPTIONAL_BACKENDS, 0)


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config.option, "numprocesses", None) or 0
    if workers > 1 and named_servers():
        raise pytest.UsageError(
            f"{' and '.join(named_servers())} set: one database for the whole run, which "
            f"{workers} workers would flush under each other: run without workers (-n 0)"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    if getattr(config.option, "dist", "no") != "no":  # the controller of a parallel run
        return [
            f"viewmw test servers, in each worker: {plan('Redis', 'VIEWMW_TEST_REDIS_URL', 6379)}",
            f"  and {plan('PostgreSQL', 'VIEWMW_TEST_DATABASE_URL', 5432)}",
        ]
    return [
        f"viewmw test servers: {support.REDIS.describe()}",
        f"  and {support.POSTGRES.describe()}",
    ]


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in OPTIONAL_BACKENDS:
            if item.get_closest_marker(marker) is not None:
                _not_run[marker] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """No silent skips: say which backends' tests this run left out."""
    left_out = {marker: count for marker, count in _not_run.items() if count}
    if not left_out:
        return
    terminalreporter.section("optional backends not tested in this run", yellow=True)
    for marker, count in left_out.items():
        terminalreporter.write_line(
            f"{count} test(s) marked `{marker}` deselected; they need {OPTIONAL_BACKENDS[marker]}."
        )


def _check_redis() -> None:
    if "redis" not in _reachable:
        try:
            redis.Redis.from_url(support.REDIS_URL, socket_timeout=2).ping()
            _reachable["redis"] = None
        except redis.RedisError as exc:
            _reachable["redis"] = HOW_TO_START_REDIS.format(
                server=support.REDIS.describe(), error=exc
            )
    if _reachable["redis"]:
        pytest.fail(_reachable["redis"], pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster of three primaries for the whole run (tests/cluster_support.py),
    started on first use (about 3 s); fails, with how to install Redis, without the binaries."""
    try:
        with local_cluster() as cluster:
            yield cluster
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
async def cluster_redis(redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """An async cluster client of :func:`redis_cluster`, every primary flushed before the test."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    )
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def real_redis() -> AsyncIterator[aioredis.Redis]:
    """The real Redis, on its dedicated test database, flushed before each test."""
    _check_redis()
    client = aioredis.Redis.from_url(support.REDIS_URL)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[aioredis.Redis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture(params=["redis", "fakeredis"])
def any_redis(request: pytest.FixtureRequest) -> aioredis.Redis:
    """Each test runs on the real Redis and again on fakeredis."""
    name = "real_redis" if request.param == "redis" else "fake_redis"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


async def _ensure_database(url: str) -> None:
    """Create the run's own PostgreSQL database if it does not exist yet (once per run)."""
    if _reachable.get("postgresql") == url:
        return
    parsed = make_url(url)
    admin = create_async_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            )
            if not exists:
                await connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        await admin.dispose()
    _reachable["postgresql"] = url


# Connections of this run's user on its database that are inside a transaction: only a test that
# failed or timed out leaves one (its tasks died holding it). Its locks would block dropping the
# tables, and every later test would hang in setup; ended here, waiting up to 5 s for each.
_END_LEFTOVER_TRANSACTIONS = text(
    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
    "WHERE datname = current_database() AND usename = current_user "
    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'"
)


async def _fresh_store(url: str) -> Store:
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(_END_LEFTOVER_TRANSACTIONS)
        for table_metadata in (viewmw_metadata, content_metadata):
            await connection.run_sync(table_metadata.drop_all)
    store = Store(engine, CONTENT_TABLES)
    await store.create_tables()
    return store


@pytest.fixture
async def pg_store() -> AsyncIterator[Store]:
    """A store on the real PostgreSQL, with empty tables."""
    try:
        await _ensure_database(support.DATABASE_URL)
        store = await _fresh_store(support.DATABASE_URL)
    except (OSError, DBAPIError) as exc:
        pytest.fail(
            HOW_TO_START_POSTGRES.format(server=support.POSTGRES.describe(), error=exc),
            pytrace=False,
        )
    yield store
    await store.close()


@pytest.fixture
async def sqlite_store(tmp_path) -> AsyncIterator[Store]:  # type: ignore[no-untyped-def]
    store = await _fresh_store(f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3")
    yield store
    await store.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each test runs on PostgreSQL and again on SQLite."""
    name = "pg_store" if request.param == "postgresql" else "sqlite_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def settings() -> Settings:
    # Generous request deadlines: tests about deadlines set their own, and a busy CI machine
    # must not turn a slow round trip into a missing count.
    return Settings(
        secret="test-secret-0123456789", redis_timeout=5.0, database_request_timeout=5.0
    )


@pytest.fixture
def tracker(
    real_redis: aioredis.Redis, sqlite_store: Store, settings: Settings, clock: FakeClock
) -> ViewTracker:
    """A tracker on the real Redis and SQLite, with the fake clock."""
    return ViewTracker(real_redis, sqlite_store, settings, clock=clock)
