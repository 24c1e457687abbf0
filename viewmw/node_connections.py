"""Script calls on a Redis Cluster, each on a lean connection to its slot's primary.

redis-py's cluster client sends every call on its own (its pipeline refuses ``EVALSHA``), with a
connection checkout, a retry wrapper and a reply parser per call. A tracker on a cluster makes one
``record_views`` call per content shard touched (and, with the daily limit, one ``reserve_daily``
per viewer shard) for each event-loop turn's views: dozens of calls at once. Here each primary
gets one :class:`~viewmw.script_connection.ScriptConnection`, and the calls of a turn bound for
it are pipelined on that one connection (hiredis packs and parses), so a turn costs one round
trip per node.

The slot map is redis-py's (``RedisCluster.nodes_manager``): a call goes to the primary that
serves its first key's slot. Redirections are replies of calls that did not run, so they are sent
again: ``MOVED`` (the node does not serve the slot any more) reads the map again; ``ASK`` (the slot
is being moved and the call's keys are gone from this node) sends the call to the node named,
right after ``ASKING``; ``TRYAGAIN`` (the slot is being moved and the call's keys are split between
the two nodes, or not all on the node an ``ASK`` named yet) waits a moment and tries the same node
again. A call gives up after a few redirections, or a few hundredths of a second of pauses, with
the last reply's error: its views go to the outbox (``viewmw.failures.never_ran``). A lost
connection is redis-py's ``ConnectionError``, as on a single Redis; the map is read again in the
background, in case a replica took over.

Each primary has a circuit breaker of its own: after three calls in a row that could not reach
it (a refused or lost connection, a node that stopped answering) or that it refused for its own
state (``LOADING``, ``BUSY``, ``MASTERDOWN``, ``CLUSTERDOWN``: raised as
:class:`~viewmw.failures.NodeDownError`), calls bound for it fail at once with ``NodeDownError``,
never sent, until one call let through after a back-off reaches it again. Its views go to the
outbox without waiting for a connection, while the other primaries' views are decided as ever.
A refused call also has the slot map read again (at most once a second), in case a replica took
over: the next calls then go to the new primary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from viewmw.failures import NodeDownError, NotSentError
from viewmw.metrics.recording import PRIMARY_BREAKER
from viewmw.outage.breaker import CircuitBreaker
from viewmw.script_connection import ScriptConnection

logger = logging.getLogger("viewmw")

# Pauses before each new try of a call refused with TRYAGAIN (its slot is being moved): a few
# hundredths of a second in all, well inside a request's deadline (0.25 s by default), so that a
# call still refused fails in time for its views to go to the outbox (they never ran), and one
# moving slot holds up its batch's other shards only briefly.
_TRYAGAIN_PAUSES = (0.005, 0.01, 0.02)
# Most MOVED and ASK redirections one call follows (a slot moves once; one more for a map that
# changed again meanwhile).
_REDIRECTIONS = 3
# Error replies that say the node itself cannot run calls now (before running any of this one):
# they count against its breaker as a lost connection does.
_NODE_REFUSALS = ("LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN")
# Least seconds between two readings of the slot map asked for by a refused call.
_REFRESH_INTERVAL = 1.0


class NodeConnections:
    """One :class:`ScriptConnection` per primary of a Redis Cluster, chosen by slot.

    Args:
        cluster: the cluster client whose slot map routes the calls (and whose credentials
            the connections use).
        connect_timeout: seconds to open a node's connection, as for :class:`ScriptConnection`.
        reply_timeout: seconds a node may go without a reply while calls wait, as for
            :class:`ScriptConnection`.
        pause: waits between tries of a call refused with ``TRYAGAIN`` (``asyncio.sleep``).
        clock: monotonic seconds for the primaries' breakers; inject one in tests.
    """

    def __init__(
        self,
        cluster: RedisCluster,
        *,
        connect_timeout: float = 2.0,
        reply_timeout: float = 2.0,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.pause = pause
        self.clock = clock
        self._connections: dict[str, ScriptConnection] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        """Each primary's breaker, by ``host:port``, made at its first call."""
        self._refreshed_at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    async def run_script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """``EVALSHA`` of ``script`` on the primary of ``keys``' slot (all keys in one slot),
        following the cluster's redirections (see the module's docstring)."""
        await self.cluster.initialize()  # learns the slot map at the first call only
        redirections, pauses = 0, iter(_TRYAGAIN_PAUSES)
        asked: str | None = None  # the node an ASK reply named, for the next try only
        while True:
            try:
                if asked is None:
                    node = self.cluster.nodes_manager.get_node_from_slot(
                        self.cluster.keyslot(keys[0])
                    )
                    return await self._call(node.host, int(node.port), script, keys, args)
                host, _, port = asked.rpartition(":")
                return await self._call(host, int(port), script, keys, args, asking=True)
            except ResponseError as exc:
                # Each of these says the call did not run: sending it again cannot count twice.
                kind, _, where = str(exc).partition(" ")
                if kind in ("MOVED", "ASK"):
                    redirections += 1
                    if redirections > _REDIRECTIONS:
                        raise
                    asked = None
                    if kind == "MOVED":
                        await self._read_slot_map()
                    else:
                        asked = where.rpartition(" ")[2]  # "ASK <slot> <host>:<port>"
                    continue
                if kind != "TRYAGAIN":
                    raise
                # The keys are split between the two nodes (or, on the node an ASK named, some
                # are not there yet): the same node again, after a pause.
                pause = next(pauses, None)
                if pause is None:
                    raise
                await self.pause(pause)

    async def _call(
        self,
        host: str,
        port: int,
        script: AsyncScript,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        asking: bool = False,
    ) -> Any:
        """One try of a call on one primary, through that primary's breaker."""
        connection = self._connection_to(host, port)
        name = f"{host}:{port}"
        breaker = self.breakers.get(name)
        if breaker is None:
            breaker = self.breakers[name] = CircuitBreaker(
                clock=self.clock,
                subject=f"Redis Cluster primary {name}",
                fallback="views bound for it go to the database outbox",
                name=PRIMARY_BREAKER + name,
            )
        if not breaker.allow():
            self._refresh_soon()  # a replica may have taken over its slots
            raise NodeDownError(f"Redis Cluster primary {name} is failing: the call was not sent")
        try:
            reply = await connection.run_script(script, keys, args, asking=asking)
        except ResponseError as exc:
            if str(exc).partition(" ")[0] in _NODE_REFUSALS:
                breaker.failure()
                self._refresh_soon()
                refused = f"Redis Cluster primary {name} refused the call: {exc}"
                raise NodeDownError(refused) from exc
            breaker.success()  # the node answered, if only to redirect the call
            raise
        except (RedisConnectionError, RedisTimeoutError):
            breaker.failure()
            raise
        except BaseException:
            breaker.inconclusive()  # cancelled, or a reply that did not parse: not the node
            raise
        breaker.success()
        return reply

    def _connection_to(self, host: str, port: int) -> ScriptConnection:
        if self._closed:
            raise NotSentError("the cluster's script connections are closed")
        name = f"{host}:{port}"
        connection = self._connections.get(name)
        if connection is None:
            connection = self._connections[name] = _Watched(
                self,
                host,
                port,
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

    def _refresh_soon(self) -> None:
        """:meth:`connection_lost`'s reading of the slot map, at most once a second."""
        now = self.clock()
        if now - self._refreshed_at >= _REFRESH_INTERVAL:
            self._refreshed_at = now
            self.connection_lost()

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
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], *, asking: bool = False
    ) -> Any:
        try:
            return await super().run_script(script, keys, args, asking=asking)
        except RedisConnectionError:
            self.owner.connection_lost()
            raise


def _logged(refresh: asyncio.Future[None]) -> None:
    if not refresh.cancelled() and (exc := refresh.exception()) is not None:
        logger.debug("reading the cluster's slot map failed: %r", exc)
