"""Clients for the servers in :class:`~viewmw.settings.Settings`, and checks that they answer.

Used by the command line and the worker, which need the real servers: a missing server is
reported in one sentence that says what to start or set, never as a stack trace.
"""

from __future__ import annotations

import asyncio
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from viewmw.assembly import as_redis, connect_redis_cluster
from viewmw.errors import ConfigurationError, ServiceUnavailableError
from viewmw.failures import FailureKind, classify
from viewmw.settings import Settings
from viewmw.store import Store

# A sync or a command is not a web request: it may wait longer on a busy server.
BACKGROUND_TIMEOUT_SECONDS = 30.0


def redis_for_background(settings: Settings) -> Redis:
    """A Redis client for syncs and commands (long timeouts). Needs ``VIEWMW_REDIS_URL``.

    On a ``redis+cluster://`` URL, a Redis Cluster client with the same timeouts (as
    :func:`viewmw.assembly.as_redis` types it); it learns the cluster's nodes at its first command.
    """
    if settings.redis_url is None:
        raise ConfigurationError(
            "VIEWMW_REDIS_URL", "is not set: give the URL of the Redis your app counts views in"
        )
    connect_timeout = max(settings.redis_timeout, 5.0)
    if settings.redis_cluster is not None:
        return as_redis(
            connect_redis_cluster(
                settings,
                socket_timeout=BACKGROUND_TIMEOUT_SECONDS,
                connect_timeout=connect_timeout,
            )
        )
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=BACKGROUND_TIMEOUT_SECONDS,
        socket_connect_timeout=connect_timeout,
    )


def redacted(url: str) -> str:
    """``url`` with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


async def ping_redis(redis: Redis, settings: Settings) -> None:
    """``PING`` the single Redis, or every primary of a Redis Cluster (``settings.redis_cluster``)
    at once: a cluster with one primary down cannot count or sync the views of its slots.

    Raises what the client raises: a ``RedisError`` or ``OSError``; on a cluster, a
    ``ConnectionError`` naming each primary that did not answer, or ``RedisClusterException``
    from a client that reaches no node (see :func:`viewmw.failures.classify`).
    """
    if settings.redis_cluster is None:
        await redis.ping()
        return
    cluster = cast(RedisCluster, redis)
    await cluster.initialize()  # learns the primaries, once
    primaries = cluster.get_primaries()
    answers = await asyncio.gather(
        *(cluster.ping(target_nodes=primary) for primary in primaries), return_exceptions=True
    )
    failed = [
        f"{primary.name}: {str(answer).splitlines()[0] if str(answer) else type(answer).__name__}"
        for primary, answer in zip(primaries, answers, strict=True)
        if isinstance(answer, BaseException)
    ]
    if failed:
        raise RedisConnectionError(f"primaries not answering PING: {'; '.join(failed)}")


async def check_redis(redis: Redis, settings: Settings) -> None:
    """Raise :class:`ServiceUnavailableError` unless Redis answers ``PING`` (on a cluster:
    every primary does), in one sentence that says what to start or set."""
    try:
        await ping_redis(redis, settings)
    except Exception as exc:
        if classify(exc) not in (FailureKind.REDIS, FailureKind.LATE):
            raise  # a bug (a call the cluster client cannot route), not an absent server
        raise ServiceUnavailableError(unreachable_redis(settings, exc)) from None


def unreachable_redis(settings: Settings, exc: BaseException) -> str:
    """The one-line message for a Redis (or Redis Cluster) that did not answer."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    url = redacted(settings.redis_url or "?")
    if settings.redis_cluster is not None:
        return (
            f"the Redis Cluster at {url} is not reachable ({reason}). Start its primaries "
            "(`redis-cli --cluster check host:port` shows one that is down) or set "
            "VIEWMW_REDIS_URL."
        )
    return (
        f"Redis at {url} is not reachable ({reason}). Start it (for example "
        "`redis-server --daemonize yes`) or set VIEWMW_REDIS_URL."
    )


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
