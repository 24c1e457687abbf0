"""The one Dramatiq broker of the worker, configured before any actor is declared.

On a Redis Cluster (a ``redis+cluster://`` ``VIEWMW_REDIS_URL``) the worker and the scheduler
also check at start-up that every primary answers, and stop with one line saying what to start
if one does not: a cluster client needs the whole slot map before it can sync anything.
"""

from __future__ import annotations

import asyncio

import dramatiq
import pendulum
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware.asyncio import AsyncIO
from periodiq import PeriodiqMiddleware

from viewmw.connections import check_redis, redis_for_background
from viewmw.errors import ConfigurationError, ServiceUnavailableError
from viewmw.jobs.settings import WorkerSettings
from viewmw.settings import Settings

# A worker that was down at the scheduled minute still runs the sync when it comes back within
# this many seconds; later, the next scheduled run catches up (pending views wait in Redis).
SCHEDULE_GRACE_SECONDS = 6 * 3600


def make_broker(worker: WorkerSettings) -> dramatiq.Broker:
    """Dramatiq's Redis, RabbitMQ or stub broker for ``worker.broker_url``, with asyncio support
    and periodiq's middleware (and viewmw's metrics server with ``worker.metrics_port``). The
    Redis broker keeps its keys under ``worker.namespace``."""
    url = worker.broker_url
    broker: dramatiq.Broker
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=url)
    elif url.startswith("stub://"):
        broker = StubBroker()
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url, namespace=worker.namespace)  # type: ignore[no-untyped-call]
    broker.add_middleware(AsyncIO())
    broker.add_middleware(PeriodiqMiddleware(skip_delay=SCHEDULE_GRACE_SECONDS))
    if worker.metrics_port is not None:
        from viewmw.jobs.metrics import WorkerMetrics

        broker.add_middleware(WorkerMetrics(worker.metrics_port))
    return broker


def load_settings() -> tuple[Settings, WorkerSettings]:
    """The library's and the worker's settings from ``VIEWMW_*``, checked.

    Raises:
        ConfigurationError: naming the variable whose value is invalid, or the database URL a
            real Redis needs.
    """
    settings = Settings.from_env()
    settings.resolved_database_url()  # no database URL with a real Redis: stop at start-up, say so
    return settings, WorkerSettings.from_env(settings)


def check_cluster(settings: Settings) -> None:
    """On a Redis Cluster, check that every primary answers ``PING``; nothing on a single Redis
    (its broker, often the same server, says so itself).

    Raises:
        ServiceUnavailableError: a primary does not answer, in one line saying what to start.
    """
    if settings.redis_cluster is not None:
        asyncio.run(_ping_every_primary(settings))


async def _ping_every_primary(settings: Settings) -> None:
    redis = redis_for_background(settings)
    try:
        await check_redis(redis, settings)
    finally:
        await redis.aclose()


try:
    settings, worker_settings = load_settings()
    check_cluster(settings)
except (ConfigurationError, ServiceUnavailableError) as exc:
    # dramatiq and periodiq would print the import error as a traceback: one line says it all
    # (SystemExit prints its text to stderr and exits 1, in dramatiq's worker process too).
    raise SystemExit(f"viewmw: {exc}") from None
broker = make_broker(worker_settings)
dramatiq.set_broker(broker)
# periodiq reads cron against pendulum's local time: make that the configured zone.
pendulum.set_local_timezone(pendulum.timezone(settings.timezone))
