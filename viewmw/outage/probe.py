"""Is Redis slow, or is the app's event loop busy? A probe timed off the event loop answers.

A reply that reaches a request after its deadline may only mean that the app's own loop was busy
(a CPU-heavy handler, a burst): the reply was on time, the loop was not. So a late reply never
counts against the breaker by itself. Instead it asks for this probe: a ``PING`` sent and timed on
a thread of its own, with a blocking socket, so the time it measures is Redis' (and the network's)
alone. Only a probe that gets no answer within ``timeout`` says that Redis is failing.

On a Redis Cluster (a ``redis+cluster://`` URL) the probe pings every primary the cluster's slot
map names, one after the other, each within ``timeout``: it is healthy only when all answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from viewmw.settings import RedisClusterURL

logger = logging.getLogger("viewmw")


class RedisProbe:
    """Pings Redis from a thread and says whether it answered within ``timeout`` seconds.

    Args:
        url: the Redis URL (``redis+cluster://`` for a cluster: every primary must answer);
            ``None`` (an in-process stand-in, which cannot be slow on its own)
            always answers healthy.
        timeout: seconds Redis has to answer, measured on the probe's thread.
        min_interval: at most one probe per this many seconds; later requests share its answer.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        url: str | None,
        timeout: float = 2.0,
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.min_interval = min_interval
        self.clock = clock
        self._client: redis.Redis | RedisCluster | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: asyncio.Future[bool] | None = None
        self._last_at = float("-inf")
        self._last_answer = True

    async def healthy(self) -> bool:
        """Whether Redis answers a ``PING`` within ``timeout`` (on a cluster: every primary
        does, each within ``timeout``). Shared by concurrent callers."""
        if self.url is None:
            return True
        if self._running is not None:
            return await asyncio.shield(self._running)
        if self.clock() - self._last_at < self.min_interval:
            return self._last_answer
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="viewmw-probe")
        self._running = loop.run_in_executor(self._executor, self._ping)
        try:
            self._last_answer = await asyncio.shield(self._running)
        finally:
            self._last_at = self.clock()
            self._running = None
        return self._last_answer

    def _ping(self) -> bool:
        assert self.url is not None
        try:
            if RedisClusterURL.is_cluster_url(self.url):
                return self._ping_cluster(self.url)
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
            started = time.monotonic()
            self._client.ping()
            return time.monotonic() - started <= self.timeout
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            logger.debug("Redis probe failed: %r", exc)
            return False

    def _ping_cluster(self, url: str) -> bool:
        if self._client is None:
            # Connects to the URL's nodes now and learns the primaries from their slot map.
            self._client = _cluster_client(url, self.timeout)
        assert isinstance(self._client, RedisCluster)
        try:
            for primary in self._client.get_primaries():  # type: ignore[no-untyped-call]
                started = time.monotonic()
                self._client.ping(target_nodes=primary)
                if time.monotonic() - started > self.timeout:
                    return False
        except BaseException:
            # Start from the URL again next time: a failed node may have changed the slot map.
            self._client.close()
            self._client = None
            raise
        return True

    def close(self) -> None:
        """Release the probe's thread and connection."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._client is not None:
            self._client.close()
            self._client = None


def _cluster_client(url: str, timeout: float) -> RedisCluster:
    cluster = RedisClusterURL.parse(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],  # type: ignore[no-untyped-call]
        username=cluster.username,
        password=cluster.password,
        ssl=cluster.tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # a probe that needs a second try has its answer
    )
