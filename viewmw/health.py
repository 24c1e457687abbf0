"""Readiness: does this deployment count views and move them into the database?

:func:`check_health` asks Redis and the database once each and compares what they hold with
:class:`HealthThresholds`; :class:`HealthEndpoint` is a tiny ASGI app answering the same as JSON
(200 healthy, 503 not) for a load balancer or a Kubernetes probe; ``viewmw health`` prints it.
Every check has its own deadline, so a probe never hangs on a server that does not answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Receive, Scope, Send

from viewmw.connections import ping_redis
from viewmw.operator_stats import pending_contents
from viewmw.outage.outbox import Outbox
from viewmw.settings import Settings
from viewmw.store import Store

REDIS, DATABASE, BACKLOG, LAST_SYNC, OUTBOX = "redis", "database", "backlog", "last_sync", "outbox"
# Failures of these checks mean a server is not reachable (``viewmw health`` exits 2).
CONNECTIVITY_CHECKS = (REDIS, DATABASE)
# A cluster client that reaches no node raises RedisClusterException, which is no RedisError.
_FAILURES = (TimeoutError, RedisError, RedisClusterException, SQLAlchemyError, OSError)


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """Where a healthy deployment ends.

    Attributes:
        max_pending_contents: contents with views waiting for the sync (the dirty set) above
            which the backlog is unhealthy. Default 100 000.
        max_sync_age_seconds: the newest committed sync must be younger than this. Default
            26 hours: the daily sync plus two hours of slack. No sync committed yet is healthy
            (a new deployment), and said so in the check's detail.
        max_outbox_events: views kept in the database during a Redis outage and not yet replayed
            above which the outbox is unhealthy. Default 10 000.
        timeout_seconds: each check's deadline. Default 2 seconds.
    """

    max_pending_contents: int = 100_000
    max_sync_age_seconds: float = 26 * 3600
    max_outbox_events: int = 10_000
    timeout_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class Check:
    """One check's answer: ``value`` is what was measured (``None`` when it could not be)."""

    name: str
    ok: bool
    detail: str
    value: float | int | None = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    """All checks; ``ok`` only if every one is."""

    ok: bool
    checks: tuple[Check, ...]

    def check(self, name: str) -> Check:
        """The check called ``name`` (``redis``, ``database``, ``backlog``, ``last_sync``,
        ``outbox``)."""
        return next(check for check in self.checks if check.name == name)

    @property
    def unreachable(self) -> bool:
        """Redis or the database did not answer."""
        return any(not c.ok for c in self.checks if c.name in CONNECTIVITY_CHECKS)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"ok": self.ok, "checks": {c.name: asdict(c) for c in self.checks}}


async def check_health(
    redis: Redis,
    store: Store,
    settings: Settings,
    thresholds: HealthThresholds | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> HealthReport:
    """Check Redis (``PING``), the database (``SELECT 1``), the pending backlog, the age of the
    last committed sync and the outbox, each within ``thresholds.timeout_seconds``.

    On a Redis Cluster (``settings.redis_cluster``), Redis is healthy only when every primary
    answers ``PING``: a primary that is down takes the views of its slots with it. The backlog
    is summed over every content shard.

    Never raises for a server that is down: that check says so and is not ok.
    """
    limits = thresholds or HealthThresholds()

    async def redis_answers() -> Check:
        await ping_redis(redis, settings)
        if settings.redis_cluster is not None:
            return Check(REDIS, True, "every primary answers PING")
        return Check(REDIS, True, "answers PING")

    async def database_answers() -> Check:
        async with store.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return Check(DATABASE, True, "answers SELECT 1")

    async def backlog() -> Check:
        # The contents a sync will move: the dirty set and those a running sync took from it.
        pending = await pending_contents(redis, settings)
        ok = pending <= limits.max_pending_contents
        return Check(
            BACKLOG,
            ok,
            f"{pending} contents pending (limit {limits.max_pending_contents})",
            pending,
        )

    async def last_sync() -> Check:
        batches = await store.last_batches(1)
        if not batches:
            return Check(LAST_SYNC, True, "no sync has committed yet")
        committed: datetime = batches[0]["committed_at"]
        if committed.tzinfo is None:  # SQLite returns the ledger's UTC times without their zone
            committed = committed.replace(tzinfo=UTC)
        age = max(clock() - committed.timestamp(), 0.0)
        ok = age <= limits.max_sync_age_seconds
        detail = (
            f"last sync committed {age:.0f}s ago at {committed.astimezone(UTC).isoformat()} "
            f"(limit {limits.max_sync_age_seconds:.0f}s)"
        )
        return Check(LAST_SYNC, ok, detail, round(age, 3))

    async def outbox() -> Check:
        waiting = cast(int, (await Outbox(store.engine).stats())["outbox_events"])
        ok = waiting <= limits.max_outbox_events
        detail = f"{waiting} views kept during a Redis outage (limit {limits.max_outbox_events})"
        return Check(OUTBOX, ok, detail, waiting)

    checks = await asyncio.gather(
        _bounded(REDIS, redis_answers, limits.timeout_seconds),
        _bounded(DATABASE, database_answers, limits.timeout_seconds),
        _bounded(BACKLOG, backlog, limits.timeout_seconds),
        _bounded(LAST_SYNC, last_sync, limits.timeout_seconds),
        _bounded(OUTBOX, outbox, limits.timeout_seconds),
    )
    return HealthReport(all(check.ok for check in checks), tuple(checks))


async def _bounded(name: str, check: Callable[[], Awaitable[Check]], seconds: float) -> Check:
    try:
        async with asyncio.timeout(seconds):
            return await check()
    except _FAILURES as exc:
        reason = str(exc).splitlines()[0] if str(exc) else f"no answer within {seconds:g}s"
        return Check(name, False, f"failed: {type(exc).__name__}: {reason}")


class HealthEndpoint:
    """An ASGI app answering every HTTP request with :func:`check_health` as JSON: 200 when
    healthy, 503 when not. Mount it where the probe looks (``Mount("/healthz", endpoint)``).

    It uses the clients it is given and never closes them: they belong to the app.
    """

    def __init__(
        self,
        redis: Redis,
        store: Store,
        settings: Settings,
        thresholds: HealthThresholds | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.thresholds = thresholds or HealthThresholds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to do here
            return
        report = await check_health(self.redis, self.store, self.settings, self.thresholds)
        body = json.dumps(report.to_dict()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if report.ok else 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
