"""Script calls on a Redis Cluster, each on a lean connection to its slot's primary.

redis-py's cluster client sends every call on its own (its pipeline refuses ``EVALSHA``), with a
connection checkout, a retry wrapper and a reply parser per call. A tracker on a cluster makes one
``record_views`` call per content shard touched (and, with the daily limit, one ``reserve_daily``
per viewer shard) for each event-loop turn's views: dozens of calls at once. Here each primary
gets one :class:`~viewmw.script_connection.ScriptConnection`, and the calls of a turn bound for
it are pipelined on that one connection (hiredis packs and parses), so a turn costs one round
trip per node.

The slot map is redis-py's (``RedisCluster.nodes_manager``): a call goes to the primary that
serves its first key's slot. A ``MOVED`` reply means the call did not run (the node does not
serve the slot any more): the map is read again and the call sent once more, to the slot's new
primary. A lost connection is redis-py's ``ConnectionError``, as on a single Redis; the map is
read again in the background, in case a replica took over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from viewmw.script_connection import ScriptConnection

logger = logging.getLogger("viewmw")


class NodeConnections:
    """One :class:`ScriptConnection` per primary of a Redis Cluster, chosen by slot.

    Args:
        cluster: the cluster client whose slot map routes the calls (and whose credentials
            the connections use).
        connect_timeout: seconds to open a node's connection, as for :class:`ScriptConnection`.
        reply_timeout: seconds a node may go without a reply while calls wait, as for
            :class:`ScriptConnection`.
    """

    def __init__(
        self, cluster: RedisCluster, *, connect_timeout: float = 2.0, reply_timeout: float = 2.0
    ) -> None:
        self.cluster = cluster
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._connections: dict[str, ScriptConnection] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    async def run_script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """``EVALSHA`` of ``script`` on the primary of ``keys``' slot (all keys in one slot)."""
        await self.cluster.initialize()  # learns the slot map at the first call only
        try:
            return await self._connection(keys[0]).run_script(script, keys, args)
        except ResponseError as exc:
            if not str(exc).startswith("MOVED"):
                raise
        # The node refused the call without running it: learn where the slot went, once.
        await self._read_slot_map()
        return await self._connection(keys[0]).run_script(script, keys, args)

    def _connection(self, key: Any) -> ScriptConnection:
        if self._closed:
            raise RedisConnectionError("the cluster's script connections are closed")
        node = self.cluster.nodes_manager.get_node_from_slot(self.cluster.keyslot(key))
        connection = self._connections.get(node.name)
        if connection is None:
            connection = self._connections[node.name] = _Watched(
                self,
                node.host,
                int(node.port),
                username=self.cluster.connection_kwargs.get("username"),
                password=self.cluster.connection_kwargs.get("password"),
                connect_timeout=self.connect_timeout,
                reply_timeout=self.reply_timeout,
            )
        return connection

    async def _read_slot_map(self) -> None:
        """Read the slot map again (one reading at a time; callers share it)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self.cluster.nodes_manager.initialize())
            self._refresh.add_done_callback(_logged)  # seen even if its caller stops waiting
        await asyncio.shield(self._refresh)

    def connection_lost(self) -> None:
        """A node's connection failed: read the slot map again soon, in the background (not
        once closed: the cluster client may be closed too, and would open connections again)."""
        if self._closed:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self.cluster.nodes_manager.initialize())
            self._refresh.add_done_callback(_logged)

    async def aclose(self) -> None:
        """Close every node's connection (and wait for a slot-map reading under way)."""
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        try:
            await asyncio.gather(*(c.aclose() for c in connections), return_exceptions=True)
        finally:
            if self._refresh is not None:
                await asyncio.gather(self._refresh, return_exceptions=True)


class _Watched(ScriptConnection):
    """A node's connection that tells its :class:`NodeConnections` when a call finds it lost."""

    def __init__(self, owner: NodeConnections, host: str, port: int, **options: Any) -> None:
        super().__init__(host, port, **options)
        self.owner = owner

    async def run_script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            return await super().run_script(script, keys, args)
        except RedisConnectionError:
            self.owner.connection_lost()
            raise


def _logged(refresh: asyncio.Future[None]) -> None:
    if not refresh.cancelled() and (exc := refresh.exception()) is not None:
        logger.debug("reading the cluster's slot map failed: %r", exc)
