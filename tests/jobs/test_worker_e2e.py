"""End to end: a real ``dramatiq viewmw.jobs`` worker process (``dramatiq jobs`` too), on the
Redis broker and on RabbitMQ.

The RabbitMQ test is marked ``rabbitmq``, deselected by default: ``nox -s tests-rabbitmq`` runs it.

Views go through the example site (``examples/site.py``, over httpx's ASGI transport); the sync is
enqueued from this process with a broker of its own on the same URL, as any producer would; the
test polls the database until the worker has done its part, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import dramatiq
import httpx
import pytest
import redis.asyncio as aioredis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.errors import BrokerError
from sqlalchemy import text

from examples.site import create_app
from tests.jobs import KEYS, QUEUE, Content, database_counts, ledger_size
from tests.jobs.worker_pause import PAUSED_KEY
from tests.support import AMQP_URL, DATABASE_URL, REDIS_URL, FakeClock
from viewmw import Settings, Store, ViewTracker
from viewmw.jobs.broker import make_broker
from viewmw.jobs.settings import WorkerSettings

# Worker processes and their deadlines (60 s a wait): past the default timeout on a busy machine,
# the test's own deadline must be what fails it, with the worker's log.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
HOW_TO_START_RABBITMQ = (
    "RabbitMQ is not reachable at {url} ({error}). Start it (e.g. `rabbitmq-server -detached` or "
    "`service rabbitmq-server start`) or point VIEWMW_TEST_AMQP_URL at one the tests may use "
    "(its 'viewmw' queue is purged)."
)
DEADLINE_SECONDS = 60.0
WORKER_OPTIONS = ("--processes", "1", "--threads", "2")
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
WORKER_SETTINGS = {
    "VIEWMW_REDIS_URL": REDIS_URL,
    "VIEWMW_DATABASE_URL": DATABASE_URL,
    "VIEWMW_TIMEZONE": "Europe/Paris",
    "VIEWMW_CONTENT_TABLES": "story=stories.view_count,fantasy=fantasies.view_count",
    # Generous request deadlines: on a busy machine a late reply must not lose a page's count.
    "VIEWMW_REDIS_TIMEOUT": "5",
    "VIEWMW_DATABASE_REQUEST_TIMEOUT": "5",
}
SITE_VIEWS: dict[str, int] = {"/stories/1": 3, "/fantasies/2": 2, "/tasks/fix-the-sync": 1}
SITE_CONTENTS: dict[str, Content] = {
    "/stories/1": ("story", "1"),
    "/fantasies/2": ("fantasy", "2"),
    "/tasks/fix-the-sync": ("task", "fix-the-sync"),
}


class WorkerProcess:
    """``dramatiq ENTRY --processes 1 --threads 2`` in a process group of its own."""

    def __init__(self, env: dict[str, str], log: Path, entry: str, *modules: str) -> None:
        self.log = log
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", entry, *modules, *WORKER_OPTIONS],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the main process and its worker process at once, like a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM to the main process, as a supervisor stops it; SIGKILL if it takes too long.

        Not to the whole group: a worker process that gets SIGTERM twice (from the group signal
        and from its parent) stops waiting for its threads and hangs.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        self.kill()  # any process of the group still there

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts workers for a broker URL; every one is stopped at the end of the test.

    ``entry`` is the module dramatiq loads first: the library's ``viewmw.jobs``, or this
    repository's deployable ``jobs``.
    """
    workers: list[WorkerProcess] = []

    def start(
        broker_url: str, *modules: str, entry: str = "viewmw.jobs", **extra_env: str
    ) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
        env.update(WORKER_SETTINGS, VIEWMW_BROKER_URL=broker_url, **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log", entry, *modules)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()


def enqueue_sync(broker_url: str) -> None:
    """Send ``sync_view_counts`` as a producer does: a broker of its own on the same URL."""
    broker = make_broker(WorkerSettings(broker_url=broker_url))
    try:
        broker.enqueue(
            dramatiq.Message(
                queue_name=QUEUE, actor_name="sync_view_counts", args=(), kwargs={}, options={}
            )
        )
    finally:
        broker.close()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, worker: WorkerProcess
) -> None:
    """Poll ``condition`` until it holds; fail with the worker's log after the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await condition():
        if worker.process.poll() is not None:
            pytest.fail(
                f"the worker exited ({worker.process.returncode}) before {what}:\n{worker.output()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {DEADLINE_SECONDS:.0f}s; worker log:\n{worker.output()}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def example_site() -> AsyncIterator[httpx.AsyncClient]:
    """The example site on the test Redis and PostgreSQL, with its lifespan run."""
    settings = Settings.from_env({**WORKER_SETTINGS, "VIEWMW_SECRET": "e2e-secret-0123456789"})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://site") as client:
            yield client


async def browse(client: httpx.AsyncClient, path: str, user: str) -> int:
    """One signed-in visit; returns the ``X-View-Count`` the page was served with."""
    response = await client.get(path, headers={"X-Demo-User": user, "User-Agent": BROWSER})
    assert response.status_code == 200
    assert response.headers["X-View-Counted"] == "1"
    return int(response.headers["X-View-Count"])


async def sync_site_views_through_worker(
    broker_url: str,
    store: Store,
    start_worker: Callable[..., WorkerProcess],
    entry: str = "viewmw.jobs",
) -> WorkerProcess:
    contents = list(SITE_CONTENTS.values())
    expected = {SITE_CONTENTS[path]: views for path, views in SITE_VIEWS.items()}
    async with example_site() as site:
        for path, views in SITE_VIEWS.items():
            shown = [await browse(site, path, f"reader{n}") for n in range(views)]
            assert shown == list(range(1, views + 1))
        assert await database_counts(store, contents) == dict.fromkeys(contents, 0)

        worker = start_worker(broker_url, entry=entry)
        enqueue_sync(broker_url)

        async def synced() -> bool:
            return await database_counts(store, contents) == expected

        await wait_until(synced, "sync into the database", worker)
        assert await ledger_size(store) == 1
        # The site shows the same totals from the database now, and keeps counting on top.
        assert await browse(site, "/stories/1", "late-reader") == SITE_VIEWS["/stories/1"] + 1
    return worker


@pytest.mark.parametrize("entry", ["viewmw.jobs", "jobs"])
async def test_a_dramatiq_worker_on_redis_syncs_the_sites_views(
    real_redis: aioredis.Redis,
    pg_store: Store,
    start_worker: Callable[..., WorkerProcess],
    entry: str,
) -> None:
    """``dramatiq viewmw.jobs`` (what users run) and ``dramatiq jobs`` (this repository's entry)."""
    await sync_site_views_through_worker(REDIS_URL, pg_store, start_worker, entry)
    assert not await real_redis.exists(KEYS.sync_batch, KEYS.sync_lock)


@contextmanager
def rabbitmq_queue() -> Iterator[None]:
    """The RabbitMQ 'viewmw' queue, empty, and this test run's alone while the test runs.

    The queue name is fixed by the actors, so concurrent test runs on one machine take turns (an
    flock) and each starts from a purged queue. Stop the worker before leaving the block.
    """
    lock_path = os.path.join(tempfile.gettempdir(), "viewmw-tests-rabbitmq.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        broker = make_broker(WorkerSettings(broker_url=AMQP_URL))
        assert isinstance(broker, RabbitmqBroker)
        try:
            try:
                broker.declare_queue(QUEUE, ensure=True)
            except BrokerError as exc:
                pytest.fail(HOW_TO_START_RABBITMQ.format(url=AMQP_URL, error=exc), pytrace=False)
            broker.flush(QUEUE)
            yield
            broker.flush(QUEUE)
        finally:
            broker.close()


@pytest.mark.rabbitmq
async def test_a_dramatiq_worker_on_rabbitmq_syncs_the_sites_views(
    real_redis: aioredis.Redis, pg_store: Store, start_worker: Callable[..., WorkerProcess]
) -> None:
    with rabbitmq_queue():
        worker = await sync_site_views_through_worker(AMQP_URL, pg_store, start_worker)
        worker.stop()  # before another test run may use the queue
    assert not await real_redis.exists(KEYS.sync_batch, KEYS.sync_lock)


# Killed in the middle of a large sync --------------------------------------------------------

CONTENT_COUNT = 20_000


def large_traffic() -> dict[str, int]:
    """Views per article id: one each, two for every fourth."""
    return {f"a{i}": 2 if i % 4 == 0 else 1 for i in range(CONTENT_COUNT)}


async def record_concurrently(
    redis: aioredis.Redis, settings: Settings, views: dict[str, int]
) -> None:
    # Seeding, not a request: give each call far more than a request's Redis timeout.
    tracker = ViewTracker(redis, None, settings.replace(redis_timeout=30.0), clock=FakeClock())
    limit = asyncio.Semaphore(50)

    async def view(content_id: str, viewer: str) -> None:
        async with limit:
            assert (await tracker.track_view("article", content_id, viewer)).counted

    await asyncio.gather(
        *(
            view(content_id, f"user:{content_id}-{n}")
            for content_id, amount in views.items()
            for n in range(amount)
        )
    )


async def article_counts(store: Store) -> dict[str, int]:
    async with store.engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT content_id, view_count FROM viewmw_view_counts "
                "WHERE content_type = 'article'"
            )
        )
        return {content_id: int(count) for content_id, count in rows}


async def count_keys(redis: aioredis.Redis, pattern: str) -> int:
    return sum([1 async for _ in redis.scan_iter(match=pattern, count=5000)])


@pytest.mark.parametrize(
    ("pause_at", "batch_items", "ledger"),
    [
        # the first snapshot chunk moved: a partial batch, nothing committed
        ("snapshot:2", "partial", 0),
        # the whole batch is in the database, nothing settled in Redis yet
        ("committed", "all", 1),
        # committed, the first settle chunk settled
        ("settle:2", "partial", 1),
    ],
)
async def test_a_worker_killed_in_the_middle_of_a_large_sync_loses_and_doubles_nothing(
    pause_at: str,
    batch_items: str,
    ledger: int,
    real_redis: aioredis.Redis,
    pg_store: Store,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = Settings.from_env(WORKER_SETTINGS)
    views = large_traffic()
    total = sum(views.values())
    await record_concurrently(real_redis, settings, views)
    assert await real_redis.scard(KEYS.dirty) == CONTENT_COUNT

    first = start_worker(REDIS_URL, "tests.jobs.worker_pause", VIEWMW_TEST_PAUSE_AT=pause_at)
    enqueue_sync(REDIS_URL)

    async def paused() -> bool:
        return bool(await real_redis.exists(PAUSED_KEY))

    await wait_until(paused, f"pause at {pause_at}", first)
    first.kill()

    # Killed mid-sync: the batch is unsettled, the lock is left behind.
    batch_id = (await real_redis.hget(KEYS.sync_batch, "id") or b"").decode()
    items = await real_redis.hlen(KEYS.sync_batch_items(batch_id))
    assert items == CONTENT_COUNT if batch_items == "all" else 0 < items < CONTENT_COUNT
    assert await ledger_size(pg_store) == ledger
    assert await real_redis.exists(KEYS.sync_lock)
    await real_redis.delete(KEYS.sync_lock)  # stands in for its expiry (60 s)

    second = start_worker(REDIS_URL)
    enqueue_sync(REDIS_URL)

    async def settled() -> bool:
        # The contents the killed run had taken wait in the run's own set until a run ends them.
        # Read at one instant (MULTI), and only once the run let go of the lock: read one by one,
        # the keys can show "no batch" between two batches and "nothing left" after the next
        # batch took the rest.
        async with real_redis.pipeline(transaction=True) as pipe:
            pipe.exists(KEYS.sync_lock, KEYS.sync_batch)
            pipe.scard(KEYS.dirty)
            pipe.scard(KEYS.draining)
            return not any(await pipe.execute())

    await wait_until(settled, "settled sync after the restart", second)
    counts = await article_counts(pg_store)
    assert sum(counts.values()) == total
    assert counts == views
    assert await count_keys(real_redis, "article:views:*") == 0
    assert await count_keys(real_redis, "article:syncing:*") == 0
    assert await ledger_size(pg_store) == (2 if ledger == 0 else 1)
