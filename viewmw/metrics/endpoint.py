"""MetricsEndpoint: an ASGI app that answers Prometheus' scrape.

It exports the process's own event metrics (or, in multi-process mode, every process's, summed
from ``PROMETHEUS_MULTIPROC_DIR``) and the state held in Redis and the database, read at scrape
time through :func:`~viewmw.health.check_health`: nothing on the request path reads them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from viewmw.errors import ConfigurationError
from viewmw.health import (
    BACKLOG,
    DATABASE,
    LAST_SYNC,
    OUTBOX,
    REDIS,
    HealthThresholds,
    check_health,
)
from viewmw.metrics.recording import prometheus_installed, recorder
from viewmw.outage.outbox import Outbox
from viewmw.settings import Settings
from viewmw.store import Store

INSTALL_HINT = "needs prometheus_client, which is not installed: pip install 'viewmw[metrics]'"


def require_prometheus(what: str) -> None:
    """Raise :class:`ConfigurationError` naming ``what`` if prometheus_client is missing."""
    if not prometheus_installed():
        raise ConfigurationError(what, INSTALL_HINT)


class MetricsEndpoint:
    """An ASGI app answering every HTTP request with viewmw's metrics in Prometheus' text format.
    Mount it where Prometheus scrapes (``Mount("/metrics", endpoint)``).

    Args:
        redis: the app's Redis client (never closed here).
        store: the app's store (never closed here).
        settings: the key prefix.
        timeout_seconds: each scrape-time read's deadline; a server that does not answer in
            time is reported down and its figures are left out of that scrape.
        clock: seconds since the epoch (tests inject one).

    Raises:
        ConfigurationError: prometheus_client is not installed (the ``metrics`` extra).
    """

    def __init__(
        self,
        redis: Redis,
        store: Store,
        settings: Settings,
        *,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        require_prometheus("MetricsEndpoint")
        self.redis = redis
        self.store = store
        self.settings = settings
        self.thresholds = HealthThresholds(timeout_seconds=timeout_seconds)
        self.clock = clock
        recorder()  # the event metrics are exported (at 0) from the first scrape on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to do here
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await self.render()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def render(self) -> bytes:
        """The exposition text: event metrics, then the figures read from the servers now."""
        from viewmw.metrics.prometheus import exposition, scraped_families

        now = self.clock()
        report, outbox_age = await asyncio.gather(
            check_health(self.redis, self.store, self.settings, self.thresholds, clock=lambda: now),
            self._oldest_outbox_view_age(now),
        )
        sync_age = report.check(LAST_SYNC).value
        scraped = scraped_families(
            redis_up=report.check(REDIS).ok,
            database_up=report.check(DATABASE).ok,
            pending_contents=_int(report.check(BACKLOG).value),
            outbox_views=_int(report.check(OUTBOX).value),
            outbox_oldest_age=outbox_age,
            last_sync_timestamp=None if sync_age is None else now - sync_age,
        )
        # Reading the multi-process files is blocking I/O: off the event loop.
        return await asyncio.to_thread(exposition, list(scraped))

    async def _oldest_outbox_view_age(self, now: float) -> float | None:
        """Seconds since the oldest outbox view was offered (0 when the outbox is empty), or
        ``None`` when the database cannot tell."""
        try:
            async with asyncio.timeout(self.thresholds.timeout_seconds):
                oldest = (await Outbox(self.store.engine).stats())["outbox_oldest"]
        except Exception:  # the database's health figures report it
            return None
        return 0.0 if oldest is None else max(now - float(oldest), 0.0)  # type: ignore[arg-type]


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
