"""Building trackers from settings: the one place that knows which clients a tracker needs.

The middleware, the example app and the tests that want a tracker "as the app would have it" ask
here; the middleware itself never imports Redis, SQLAlchemy or the store. A tracker built here owns
its clients: :class:`BuiltTracker` starts it (tables, mapping, outbox replay) and closes them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Column

from viewmw.errors import ConfigurationError
from viewmw.mapping import record_mapping
from viewmw.node_connections import NodeConnections
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox
from viewmw.packing import connection_class_for
from viewmw.script_connection import ScriptConnection
from viewmw.settings import Settings
from viewmw.store import Store
from viewmw.tracker import ViewTracker

logger = logging.getLogger("viewmw")

REDIS_MAX_CONNECTIONS = 100


def build_tracker(
    settings: Settings,
    content_tables: Mapping[str, Column[Any]] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> ViewTracker:
    """A tracker on new clients for ``settings.redis_url`` and ``settings.database_url``.

    Content types map to ``content_tables`` if given, else to ``settings.content_tables``. Without
    a Redis URL it runs on an in-process fakeredis; on a ``redis+cluster://`` URL, on a Redis
    Cluster client (see :func:`connect_redis`). Views go to a single Redis on a dedicated lean
    connection (:mod:`viewmw.script_connection`) where the URL allows one, and to a cluster on
    one such connection per primary (:mod:`viewmw.node_connections`; not over TLS, where
    redis-py's client carries them). The caller owns the clients: close them with
    :func:`close_clients`, or use :class:`BuiltTracker`, which does.
    """
    if content_tables is None:
        store = Store.from_settings(settings)
    else:
        store = Store.from_url(settings.resolved_database_url(), content_tables, pool_pre_ping=True)
    redis = connect_redis(settings)
    script_connection: ScriptConnection | NodeConnections | None = None
    cluster = settings.redis_cluster
    if cluster is not None:
        if not cluster.tls:
            script_connection = NodeConnections(
                cast(RedisCluster, redis),
                connect_timeout=settings.redis_probe_timeout,
                reply_timeout=settings.redis_probe_timeout,
            )
    elif settings.redis_url is not None:
        script_connection = ScriptConnection.from_url(
            settings.redis_url,
            connect_timeout=settings.redis_probe_timeout,
            reply_timeout=settings.redis_probe_timeout,
        )
    return ViewTracker(redis, store, settings, clock=clock, script_connection=script_connection)


async def close_clients(tracker: ViewTracker) -> None:
    """Close the clients of a tracker from :func:`build_tracker`: the script connection (first:
    on a cluster it reads the slot map through the Redis client), Redis and the database engine
    (each even if closing another failed)."""
    try:
        if tracker.script_connection is not None:
            await tracker.script_connection.aclose()
    finally:
        try:
            await tracker.redis.aclose()
        finally:
            if tracker.store is not None:
                await tracker.store.close()


class BuiltTracker:
    """A :class:`~viewmw.ResilientTracker` on clients built from settings, which it owns.

    Args:
        settings: where Redis and the database are, and everything else.
        content_tables: content type -> count column of its own table (default:
            ``settings.content_tables``).
        create_tables: create viewmw's tables (and the content tables) at :meth:`startup`.
        clock: seconds since the epoch; inject one in tests.
    """

    def __init__(
        self,
        settings: Settings,
        content_tables: Mapping[str, Column[Any]] | None = None,
        *,
        create_tables: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        owned = build_tracker(settings, content_tables, clock=clock)
        assert owned.store is not None  # build_tracker always gives it one
        self.tracker = ResilientTracker(owned, Outbox(owned.store.engine))
        self.create_tables = create_tables
        self._closed = False

    async def startup(self) -> None:
        """Learn a Redis Cluster's nodes (:func:`learn_cluster`), record the content table
        mapping in Redis for the sync to check (:mod:`viewmw.mapping`), create the tables (if
        ``create_tables``), and start replaying views an earlier run left in the outage outbox.

        A database that cannot be reached is logged, not raised: the app starts anyway and
        serves its pages without counts.
        """
        owned = self.tracker.tracker
        store = owned.store
        assert store is not None
        # A cluster that did not answer has said so in one line; recording would only fail too.
        if await learn_cluster(owned.redis, owned.settings):
            await record_mapping(owned.redis, owned.keys, store)
        if self.create_tables:
            try:
                async with asyncio.timeout(owned.settings.database_timeout):
                    await store.create_tables()
            except Exception:
                logger.exception("viewmw: creating the view count tables failed")
        await self.tracker.startup()

    async def aclose(self) -> None:
        """Write the outbox events still in memory and close the clients (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.tracker.aclose()
        finally:
            await close_clients(self.tracker.tracker)


def connect_redis(settings: Settings) -> Redis:
    """A Redis client for ``settings.redis_url`` sized for request paths.

    Requests wait for a free connection (up to ``redis_timeout``) instead of failing when all are
    busy, and a failed command is never resent. The socket timeouts are ``redis_probe_timeout``,
    a backstop far above the request deadline: a request stops waiting at ``redis_timeout``, but
    the reply is still read, so a loop that was merely busy never breaks the connection. With no
    URL set: an in-process fakeredis, with a warning that its counts are neither shared nor kept.
    With a ``redis+cluster://`` URL: :func:`connect_redis_cluster`'s client, seen through
    :func:`as_redis`.

    Raises:
        ConfigurationError: no URL is set and fakeredis is not installed.
    """
    if settings.redis_url is None:
        return _embedded_redis()
    if settings.redis_cluster is not None:
        return as_redis(connect_redis_cluster(settings))
    packing = connection_class_for(settings.redis_url)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        **({"connection_class": packing} if packing else {}),
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_probe_timeout,
        socket_connect_timeout=settings.redis_probe_timeout,
        # Never resend: a script that timed out may have run, and a resent one counts again.
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


def as_redis(cluster: RedisCluster) -> Redis:
    """``cluster`` as the type the tracker, the sync, health and the statistics take.

    viewmw's one cast of a cluster client. Those are typed for ``redis.asyncio.Redis`` and use
    only what a ``RedisCluster`` answers the same way: scripts whose keys share one slot (the
    content shards of ``settings.content_shards()`` see to it), pipelines without ``EVALSHA``,
    ``SCAN`` over every primary, ``PING`` of every node. They learn that Redis is a cluster from
    the settings (``settings.redis_cluster``), never from the client's type.
    """
    return cast(Redis, cluster)


def connect_redis_cluster(
    settings: Settings,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
) -> RedisCluster:
    """A Redis Cluster client for a ``redis+cluster://`` ``settings.redis_url``.

    Starts from the nodes the URL names and learns the others from them (at its first command).
    As :func:`connect_redis`, it never resends a command: redis-py's cluster client would by
    default retry a command (and a whole pipeline) after a timeout, and a script that timed out
    may have run. ``max_connections`` is per node; the cluster client has no blocking pool, so
    a node with all its connections busy raises ``MaxConnectionsError``. The socket timeouts
    default to ``settings.redis_probe_timeout`` (request paths); background work passes longer
    ones.

    Raises:
        ConfigurationError: the URL does not name a Redis Cluster.
    """
    cluster = settings.redis_cluster
    if cluster is None:
        raise ConfigurationError("redis_url", "must be a redis+cluster:// URL for a cluster client")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
        username=cluster.username,
        password=cluster.password,
        ssl=cluster.tls,
        max_connections=REDIS_MAX_CONNECTIONS,
        socket_timeout=socket_timeout or settings.redis_probe_timeout,
        socket_connect_timeout=connect_timeout or settings.redis_probe_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


async def learn_cluster(redis: Redis, settings: Settings, *, wait_seconds: float = 5.0) -> bool:
    """On a Redis Cluster, learn its nodes and slots now, before the first requests; returns
    whether it did (``True`` at once on a single Redis).

    A cluster client learns them at its first command, and redis-py's asyncio client fails
    commands sent concurrently while it does (the connections they opened are closed under
    them): a burst of first requests would count none. Never raises, and waits at most
    ``wait_seconds``: an app starts whether or not the cluster answers (the outage path takes
    its views, as for a single Redis that is down), and says so in one line.
    """
    if settings.redis_cluster is None:
        return True
    try:
        async with asyncio.timeout(wait_seconds):
            await cast(RedisCluster, redis).initialize()
    except Exception as exc:
        nodes = ",".join(f"{host}:{port}" for host, port in settings.redis_cluster.nodes)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning(
            "viewmw: the Redis Cluster at %s did not answer at start-up (%s); start its "
            "primaries or set VIEWMW_REDIS_URL",
            nodes,
            reason,
        )
        return False
    return True


def _embedded_redis() -> Redis:
    if importlib.util.find_spec("fakeredis") is None or importlib.util.find_spec("lupa") is None:
        raise ConfigurationError(
            "VIEWMW_REDIS_URL",
            "is not set and the embedded stand-in is not installed: "
            "`pip install viewmw[embedded]`, or set VIEWMW_REDIS_URL=redis://host:6379/0",
        )
    import fakeredis

    logger.warning(
        "viewmw: VIEWMW_REDIS_URL is not set; counting views in an in-process fakeredis. "
        "Counts are not shared between processes, and views not yet synced are lost at exit."
    )
    return cast(Redis, fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
