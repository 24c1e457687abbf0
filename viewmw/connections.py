"""Clients for the servers in :class:`~viewmw.settings.Settings`, and checks that they answer.

Used by the command line and the worker, which need the real servers: a missing server is
reported in one sentence that says what to start or set, never as a stack trace.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from viewmw.errors import ConfigurationError, ServiceUnavailableError
from viewmw.settings import CLUSTER_NOT_SUPPORTED, Settings
from viewmw.store import Store

# A sync or a command is not a web request: it may wait longer on a busy server.
BACKGROUND_TIMEOUT_SECONDS = 30.0


def redis_for_background(settings: Settings) -> Redis:
    """A Redis client for syncs and commands (long timeouts). Needs ``VIEWMW_REDIS_URL``."""
    if settings.redis_url is None:
        raise ConfigurationError(
            "VIEWMW_REDIS_URL", "is not set: give the URL of the Redis your app counts views in"
        )
    if settings.redis_cluster is not None:
        raise ConfigurationError("VIEWMW_REDIS_URL", CLUSTER_NOT_SUPPORTED)
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=BACKGROUND_TIMEOUT_SECONDS,
        socket_connect_timeout=max(settings.redis_timeout, 5.0),
    )


def redacted(url: str) -> str:
    """``url`` with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


async def check_redis(redis: Redis, url: str | None) -> None:
    """Raise :class:`ServiceUnavailableError` unless Redis answers ``PING``."""
    try:
        await redis.ping()
    except (TimeoutError, RedisError, OSError) as exc:
        raise ServiceUnavailableError(
            f"Redis at {redacted(url or '?')} is not reachable ({exc}). Start it (for example "
            "`redis-server --daemonize yes`) or set VIEWMW_REDIS_URL."
        ) from None


async def check_database(store: Store) -> None:
    """Raise :class:`ServiceUnavailableError` unless the database answers a query."""
    url = store.engine.url.render_as_string(hide_password=True)
    try:
        async with store.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (TimeoutError, SQLAlchemyError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        raise ServiceUnavailableError(
            f"the database at {url} is not reachable ({reason}). Start it or set "
            "VIEWMW_DATABASE_URL."
        ) from None
