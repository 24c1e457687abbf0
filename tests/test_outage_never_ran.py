"""A view whose Redis call provably never ran (never sent, or refused before Redis ran any of it)
is kept in the outbox at once, before the breaker opens, in the default and the deferred mode;
its replay counts it once. A call that may have run (a connection lost after the write, a late
reply, an error from inside the script) stays an unknown outcome, never kept twice."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    BusyLoadingError,
    MaxConnectionsError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.asgi_support import StubRedis
from tests.support import REDIS_URL, FakeClock
from tests.test_outage_failover import ScriptedProbe, resilient
from viewmw import Outbox, Replayer, ResilientTracker, Settings, Store, ViewTracker
from viewmw.assembly import connect_redis
from viewmw.failures import NodeDownError, NotSentError, NotSentTimeoutError, never_ran
from viewmw.outage.breaker import BreakerState
from viewmw.pipeline import LateReply
from viewmw.script_connection import ScriptConnection


@pytest.mark.parametrize(
    "failure",
    [
        NotSentError("Error connecting to 127.0.0.1:1: refused"),
        NotSentTimeoutError("Timeout connecting to 127.0.0.1:1"),
        NodeDownError("Redis Cluster primary 127.0.0.1:1 is failing: the call was not sent"),
        # redis-py's own wording for a connection it could not open (nothing written yet).
        RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
        RedisConnectionError("Error connecting to 127.0.0.1:1."),
        RedisTimeoutError("Timeout connecting to server"),
        RedisConnectionError(
            "Error Multiple exceptions: [Errno 111] refused, [Errno 99] unavailable connecting "
            "to localhost:6379."
        ),
        MaxConnectionsError("Too many connections"),
        RedisConnectionError("No connection available."),
        BusyLoadingError("Redis is loading the dataset in memory"),
        ReadOnlyError("You can't write against a read only replica."),
        TryAgainError("Multiple keys request during rehashing of slot"),
        ResponseError("LOADING Redis is loading the dataset in memory"),
        ResponseError("BUSY Redis is busy running a script."),
        ResponseError("MASTERDOWN Link with MASTER is down"),
        ResponseError("CLUSTERDOWN The cluster is down"),
        ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
        ResponseError("MOVED 3999 127.0.0.1:7001"),
    ],
)
def test_a_failure_before_redis_ran_anything_is_told_apart(failure: Exception) -> None:
    assert never_ran(failure)


@pytest.mark.parametrize(
    "failure",
    [
        RedisConnectionError("Connection lost: reset by peer"),  # after the write: may have run
        RedisConnectionError("Error while reading from 127.0.0.1:6379 : (104, 'reset')"),
        RedisConnectionError("Connection closed by server."),
        RedisTimeoutError("Timeout reading from 127.0.0.1:6379"),
        LateReply(),
        TimeoutError(),
        ResponseError("ERR Error running script (call to f_0123): @user_script:12: boom"),
        ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        NoPermissionError("this user has no permissions to run the 'incr' command"),
        ResponseError("LOADINGX not a code"),
    ],
)
def test_a_failure_that_may_have_run_is_an_unknown_outcome(failure: Exception) -> None:
    assert not never_ran(failure)


@pytest.mark.parametrize("connection", ["script connection", "redis-py"])
async def test_views_refused_by_a_loading_redis_are_kept_and_replayed_once(
    connection: str,
    real_redis: aioredis.Redis,
    store: Store,
    settings: Settings,
    clock: FakeClock,
) -> None:
    # The lean connection is refused at the EVALSHA, redis-py already at its connection's
    # handshake (CLIENT SETINFO): neither sent the script call.
    loading_reply = b"-LOADING Redis is loading the dataset in memory\r\n"
    async with StubRedis(reply=loading_reply) as loading:
        stub_settings = settings.replace(redis_url=loading.url)
        client = connect_redis(stub_settings)
        lean = ScriptConnection.from_url(loading.url) if connection == "script connection" else None
        tracker = ViewTracker(client, store, stub_settings, clock=clock, script_connection=lean)
        failover = resilient(tracker, store, ScriptedProbe(), FakeClock(now=0.0))
        try:
            results = [await failover.track_view("story", "5", f"user:{n}") for n in range(2)]
        finally:
            await failover.aclose()
            await client.aclose()
            if lean is not None:
                await lean.aclose()
    assert [(r.counted, r.queued) for r in results] == [(False, True), (False, True)]
    # Two failures: below the breaker's three, and kept all the same.
    assert failover.breaker.state is BreakerState.CLOSED
    outbox = Outbox(store.engine)
    assert await outbox.counts("story", ["5"]) == {"5": 2}

    healthy = ViewTracker(real_redis, store, settings, clock=clock)
    report = await Replayer(healthy, outbox).replay()
    assert report.counted == 2
    assert await outbox.counts("story", ["5"]) == {"5": 0}
    assert await healthy.get_redis_view_count("story", "5") == 2


class _OnePrimaryDown(ScriptConnection):
    """A script connection whose every call is bound for a cluster primary whose own breaker is
    open: refused at once, never sent."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 1)

    async def run_script(self, *_: object, **__: object) -> object:
        raise NodeDownError("Redis Cluster primary 127.0.0.1:1 is failing: the call was not sent")


async def test_views_bound_for_a_primary_whose_breaker_is_open_are_kept_and_open_nothing_more(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    down = _OnePrimaryDown()
    tracker = ViewTracker(real_redis, store, settings, clock=clock, script_connection=down)
    breaker_clock = FakeClock(now=0.0)
    failover = resilient(tracker, store, ScriptedProbe(), breaker_clock)
    try:
        results = [await failover.track_view("story", "8", f"user:{n}") for n in range(5)]
        # That primary's breaker speaks for it: the whole-Redis breaker stays closed.
        assert failover.breaker.state is BreakerState.CLOSED
        # A whole-Redis breaker already open lets one view through after its back-off; that
        # view meeting the primary's breaker decides nothing, and the next may try again.
        failover.breaker.trip()
        breaker_clock.advance(60.0)
        after = [await failover.track_view("story", "8", f"user:{n}") for n in range(5, 7)]
        assert failover.breaker.state is BreakerState.HALF_OPEN
    finally:
        await failover.aclose()
    assert all(r.queued and not r.counted for r in results + after)
    assert await Outbox(store.engine).counts("story", ["8"]) == {"8": 7}


async def cut_off(
    redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock, content_id: str
) -> ResilientTracker:
    """An outage-path tracker on a script connection that has counted one view of the content
    (so the deferred mode knows its count), then closed its connection: no call is sent since."""
    lean = ScriptConnection.from_url(REDIS_URL)
    assert lean is not None
    tracker = ViewTracker(redis, store, settings, clock=clock, script_connection=lean)
    failover = resilient(tracker, store, ScriptedProbe(), FakeClock(now=0.0))
    assert (await failover.track_view("story", content_id, "user:1")).counted
    await lean.aclose()
    return failover


async def test_a_deferred_view_whose_call_was_never_sent_is_kept(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    failover = await cut_off(real_redis, store, settings, clock, "6")
    try:
        offered_at = clock.now
        assert failover.offer_valid_view("story", "6", "user:2") == 1
        clock.now += 3600  # the refusal is handled later: the view keeps its own time
        await failover.drain()
    finally:
        await failover.aclose()
    (kept,) = await Outbox(store.engine).oldest(10)
    assert (kept.content_id, kept.viewer, kept.viewed_at) == ("6", "user:2", offered_at)
    assert await real_redis.get("story:views:6") == b"1"  # only the first reached Redis


async def test_a_deferred_view_refused_as_the_app_stops_is_kept(
    real_redis: aioredis.Redis, store: Store, settings: Settings, clock: FakeClock
) -> None:
    failover = await cut_off(real_redis, store, settings, clock, "8")
    try:
        assert failover.offer_valid_view("story", "8", "user:2") == 1
    finally:
        await failover.aclose()  # at once: the refusal comes while it closes
    assert await Outbox(store.engine).counts("story", ["8"]) == {"8": 1}
