"""Each Redis Cluster primary's own breaker (viewmw.node_connections.NodeConnections._call), with
a connection whose outcomes the test sets: which outcomes count against the primary, that calls
bound for a failing primary are refused unsent, that a trial is never left hanging, and that a
refused call has the slot map read again, at most once a second. The real-cluster behaviour (a
killed primary) is in tests/test_node_connections.py and tests/test_cluster_outage.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, cast

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support import FakeClock
from viewmw.failures import NodeDownError, NotSentError, never_ran
from viewmw.node_connections import NodeConnections
from viewmw.outage.breaker import BreakerState

NODE = ("127.0.0.1", 7000)
NAME = "127.0.0.1:7000"


class _SlotMap:
    """What NodeConnections asks of a cluster client's slot map: here, only how often it was
    read again."""

    def __init__(self) -> None:
        self.readings = 0

    async def initialize(self) -> None:
        self.readings += 1


class _Cluster:
    def __init__(self) -> None:
        self.nodes_manager = _SlotMap()


class _Connection:
    """A node's connection that answers each call with the next outcome given (an exception is
    raised), counting the calls that reached it."""

    def __init__(self) -> None:
        self.outcomes: Iterator[Any] = iter(())
        self.calls = 0

    async def run_script(self, *_: Any, **__: Any) -> Any:
        self.calls += 1
        outcome = next(self.outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(now=0.0)


@pytest.fixture
def cluster() -> _Cluster:
    return _Cluster()


@pytest.fixture
async def nodes(cluster: _Cluster, clock: FakeClock) -> Any:
    connections = NodeConnections(cast(RedisCluster, cluster), clock=clock)
    connection = _Connection()
    connections._connection_to = lambda host, port: connection  # type: ignore[method-assign]
    yield connections, connection
    await connections.aclose()


async def _call(connections: NodeConnections) -> Any:
    return await connections._call(*NODE, cast(Any, None), ["k"], [])


async def test_three_unreachable_calls_open_the_primarys_breaker_and_later_calls_go_unsent(
    nodes: Any, clock: FakeClock
) -> None:
    connections, connection = nodes
    connection.outcomes = iter(
        [
            NotSentError("refused"),
            RedisConnectionError("Connection lost"),
            RedisTimeoutError("no reply"),
            "back",
        ]
    )
    for _ in range(3):
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await _call(connections)
    assert connections.breakers[NAME].state is BreakerState.OPEN
    with pytest.raises(NodeDownError) as refused:
        await _call(connections)
    assert connection.calls == 3 and never_ran(refused.value)  # not sent: kept in the outbox

    clock.advance(1.0)  # the back-off: one call tries the primary, and its answer closes it
    assert await _call(connections) == "back"
    assert connections.breakers[NAME].state is BreakerState.CLOSED


async def test_a_cancelled_trial_leaves_the_next_call_free_to_try(
    nodes: Any, clock: FakeClock
) -> None:
    connections, connection = nodes
    connection.outcomes = iter([NotSentError("refused")] * 3 + [asyncio.CancelledError(), "ok"])
    for _ in range(3):
        with pytest.raises(NotSentError):
            await _call(connections)
    clock.advance(1.0)
    with pytest.raises(asyncio.CancelledError):
        await _call(connections)  # the trial: its request gave up on it
    assert await _call(connections) == "ok"  # not left waiting for the cancelled trial
    assert connections.breakers[NAME].state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "reply",
    [
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script.",
        "MASTERDOWN Link with MASTER is down",
        "CLUSTERDOWN The cluster is down",
    ],
)
async def test_a_primary_refusing_for_its_own_state_counts_against_its_breaker(
    nodes: Any, reply: str
) -> None:
    connections, connection = nodes
    connection.outcomes = iter([ResponseError(reply)] * 3)
    for _ in range(3):
        with pytest.raises(NodeDownError) as refused:
            await _call(connections)
        assert never_ran(refused.value)
    assert connections.breakers[NAME].state is BreakerState.OPEN


async def test_redirections_and_script_errors_are_answers_of_a_working_primary(
    nodes: Any,
) -> None:
    connections, connection = nodes
    replies = ["MOVED 3999 127.0.0.1:7001", "TRYAGAIN Multiple keys", "ERR Error running script"]
    connection.outcomes = iter([ResponseError(reply) for reply in replies * 2])
    for _ in range(len(replies) * 2):
        with pytest.raises(ResponseError):
            await _call(connections)
    assert connections.breakers[NAME].state is BreakerState.CLOSED


async def test_refused_calls_read_the_slot_map_again_at_most_once_a_second(
    nodes: Any, cluster: _Cluster, clock: FakeClock
) -> None:
    connections, connection = nodes
    connection.outcomes = iter([NotSentError("refused")] * 3)
    for _ in range(3):
        with pytest.raises(NotSentError):
            await _call(connections)
    readings = cluster.nodes_manager.readings
    for _ in range(5):  # refused unsent, all within the same second
        with pytest.raises(NodeDownError):
            await _call(connections)
    await asyncio.sleep(0)  # the reading runs in the background
    assert cluster.nodes_manager.readings == readings + 1
    clock.advance(0.5)
    with pytest.raises(NodeDownError):
        await _call(connections)
    await asyncio.sleep(0)
    assert cluster.nodes_manager.readings == readings + 1
