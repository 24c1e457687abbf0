"""The dedicated script connection: replies, NOSCRIPT, lost connections, late replies,
concurrency and cancellation, on the real Redis, on fakeredis' TCP server, and on scripted fake
servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import fakeredis
import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.asgi_support import RedisProcess, free_port
from tests.support import REDIS_URL, FakeClock
from viewmw import Settings, ViewTracker
from viewmw.assembly import build_tracker
from viewmw.errors import MalformedReplyError
from viewmw.failures import FailureKind, NotSentError, classify
from viewmw.pipeline import LateReply
from viewmw.script_connection import ScriptConnection

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"
SLOW_ECHO = "local n = 0 for i = 1, tonumber(ARGV[2]) do n = n + 1 end return {KEYS[1], n}"

Reply = Callable[[list[bytes]], Awaitable[bytes | None]]
"""A fake server's answer to one command: bytes to send, or ``None`` to close the connection."""


@asynccontextmanager
async def fake_server(answer: Reply) -> AsyncIterator[tuple[int, list[list[bytes]]]]:
    """A TCP server speaking RESP that answers each command with ``answer``; yields its port and
    the commands it received."""
    received: list[list[bytes]] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    received.append(command)
                    reply = await answer(command)
                    if reply is None:
                        return
                    writer.write(reply)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def private_redis() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A Redis of this test's own: CLIENT PAUSE on a shared one would stall other test runs."""
    server = RedisProcess(free_port())
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client, server.url
    finally:
        await client.aclose()
        server.kill()


@asynccontextmanager
async def connection_to(url: str, **options: float) -> AsyncIterator[ScriptConnection]:
    connection = ScriptConnection.from_url(url, **options)
    assert connection is not None
    try:
        yield connection
    finally:
        await connection.aclose()


@contextmanager
def fakeredis_tcp() -> Iterator[str]:
    """fakeredis' TCP server (with Lua), in a thread; yields its URL."""
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"redis://{host}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# Replies ---------------------------------------------------------------------------------------


async def test_a_script_call_returns_redis_reply(real_redis: aioredis.Redis) -> None:
    script = real_redis.register_script(ECHO)
    async with connection_to(REDIS_URL) as connection:
        reply = await connection.run_script(script, ["k"], ["hello", 21])
    assert reply == [b"k", b"hello", 42]
    assert reply == await script(keys=["k"], args=["hello", 21])  # as redis-py answers


async def test_calls_use_the_database_of_the_url(real_redis: aioredis.Redis) -> None:
    script = real_redis.register_script("return redis.call('INCR', KEYS[1])")
    async with connection_to(REDIS_URL) as connection:
        assert await connection.run_script(script, ["db-check"], []) == 1
    assert await real_redis.get("db-check") == b"1"  # the fixture's own database number


async def test_an_error_reply_raises_redis_own_error(real_redis: aioredis.Redis) -> None:
    script = real_redis.register_script("return redis.error_reply('refused on purpose')")
    async with connection_to(REDIS_URL) as connection:
        with pytest.raises(ResponseError, match="refused on purpose"):
            await connection.run_script(script, [], [])
        # The connection goes on: the error was one reply, not a broken stream.
        assert await connection.execute(("PING",)) == b"PONG"


async def test_a_script_missing_from_redis_is_loaded_and_run(real_redis: aioredis.Redis) -> None:
    script = real_redis.register_script(ECHO)
    async with connection_to(REDIS_URL) as connection:
        await real_redis.script_flush()
        assert await connection.run_script(script, ["k"], ["a", 1]) == [b"k", b"a", 2]
        assert await real_redis.script_exists(script.sha) == [True]


async def test_calls_on_fakeredis_tcp_server() -> None:
    with fakeredis_tcp() as url:
        client = aioredis.Redis.from_url(url)
        try:
            script = client.register_script(ECHO)
            async with connection_to(url) as connection:
                # fakeredis has never seen the script: NOSCRIPT, then loaded and run.
                assert await connection.run_script(script, ["k"], ["b", 3]) == [b"k", b"b", 6]
                replies = await asyncio.gather(
                    *(connection.run_script(script, [f"k{n}"], ["c", n]) for n in range(50))
                )
            assert replies == [[f"k{n}".encode(), b"c", 2 * n] for n in range(50)]
        finally:
            await client.aclose()


async def test_every_concurrent_call_gets_its_own_reply(real_redis: aioredis.Redis) -> None:
    """Hundreds of calls in flight on one connection, of very different lengths: replies come
    back in order and each reaches its own caller."""
    script = real_redis.register_script(SLOW_ECHO)
    async with connection_to(REDIS_URL) as connection:
        replies = await asyncio.gather(
            *(connection.run_script(script, [f"k{n}"], ["x", (n % 7) * 3000]) for n in range(500))
        )
    assert replies == [[f"k{n}".encode(), (n % 7) * 3000] for n in range(500)]


async def test_the_url_decides_where_the_connection_goes() -> None:
    assert ScriptConnection.from_url("rediss://cache.example:6380/0") is None  # TLS: redis-py
    unix = ScriptConnection.from_url("unix:///run/redis.sock?db=2")
    assert unix is not None and (unix.path, unix.db) == ("/run/redis.sock", 2)
    tcp = ScriptConnection.from_url("redis://user:secret@cache.example:6380/3")
    assert tcp is not None
    assert (tcp.host, tcp.port, tcp.db) == ("cache.example", 6380, 3)
    assert (tcp.username, tcp.password) == ("user", "secret")


async def test_it_authenticates_and_selects_before_the_first_call() -> None:
    async def answer(command: list[bytes]) -> bytes:
        return b"+OK\r\n" if command[0] in (b"AUTH", b"SELECT") else b":7\r\n"

    async with (
        fake_server(answer) as (port, received),
        connection_to(f"redis://viewmw:pw@127.0.0.1:{port}/5") as connection,
    ):
        assert await connection.execute(("GET", "x")) == 7
    assert received == [[b"AUTH", b"viewmw", b"pw"], [b"SELECT", b"5"], [b"GET", b"x"]]


async def test_a_refused_password_is_an_authentication_error() -> None:
    async def answer(command: list[bytes]) -> bytes:
        return b"-WRONGPASS invalid username-password pair\r\n"

    async with (
        fake_server(answer) as (port, _),
        connection_to(f"redis://:bad@127.0.0.1:{port}/0") as connection,
    ):
        with pytest.raises(AuthenticationError):
            await connection.execute(("PING",))


# Failures --------------------------------------------------------------------------------------


async def test_a_server_that_closes_mid_batch_fails_every_waiting_call() -> None:
    """The first call is answered, then the server hangs up: every other call waiting on the
    connection gets a Redis connection error (none hangs), and the next call reconnects."""
    answered = 0

    async def answer(command: list[bytes]) -> bytes | None:
        nonlocal answered
        if command[0] == b"PING":
            return b"+PONG\r\n"
        answered += 1
        return b":1\r\n" if answered == 1 else None

    async with (
        fake_server(answer) as (port, _),
        connection_to(f"redis://127.0.0.1:{port}/0") as connection,
    ):
        calls = [connection.execute(("INCR", f"k{n}")) for n in range(20)]
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert outcomes[0] == 1
        assert all(isinstance(o, RedisConnectionError) for o in outcomes[1:]), outcomes
        assert {classify(o) for o in outcomes[1:]} == {FailureKind.REDIS}
        assert await connection.execute(("PING",)) == b"PONG"  # a new connection


async def test_a_server_that_is_down_is_a_redis_connection_error() -> None:
    async with fake_server(lambda command: asyncio.sleep(0, b"+OK\r\n")) as (port, _):
        pass  # the port is free again
    async with connection_to(f"redis://127.0.0.1:{port}/0") as connection:
        with pytest.raises(RedisConnectionError) as caught:
            await connection.execute(("PING",))
    assert classify(caught.value) is FailureKind.REDIS


async def test_a_redis_that_never_answers_times_out_as_a_redis_failure() -> None:
    """The reply backstop: a stalled Redis is a Redis failure (the breaker's business), and
    the connection it stalled is dropped."""
    stall = asyncio.Event()

    async def answer(command: list[bytes]) -> bytes:
        await stall.wait()
        return b"+OK\r\n"

    async with (
        fake_server(answer) as (port, _),
        connection_to(f"redis://127.0.0.1:{port}/0", reply_timeout=0.2) as connection,
    ):
        outcomes = await asyncio.gather(
            *(connection.execute(("PING",)) for _ in range(3)), return_exceptions=True
        )
        stall.set()
    assert all(isinstance(o, RedisTimeoutError) for o in outcomes), outcomes
    assert {classify(o) for o in outcomes} == {FailureKind.REDIS}


async def test_bytes_that_are_not_resp_are_a_malformed_reply() -> None:
    async def answer(command: list[bytes]) -> bytes:
        return b"?this is not redis\r\n"

    async with (
        fake_server(answer) as (port, _),
        connection_to(f"redis://127.0.0.1:{port}/0") as connection,
    ):
        with pytest.raises(MalformedReplyError) as caught:
            await connection.execute(("PING",))
    assert classify(caught.value) is FailureKind.REDIS


# Late replies and cancellation -----------------------------------------------------------------


@pytest.mark.slow
async def test_a_caller_that_stops_waiting_leaves_the_stream_in_order() -> None:
    """A caller cancelled (or late) while its call is in flight: the call still runs, its
    reply is read and dropped, and the next caller gets its own reply, not that one."""
    async with private_redis() as (redis, url), connection_to(url) as connection:
        script = redis.register_script("return redis.call('INCR', KEYS[1])")
        await connection.run_script(script, ["warm"], [])
        await redis.client_pause(300, all=False)  # scripts wait; other commands answer
        slow = asyncio.create_task(connection.run_script(script, ["cancelled"], []))
        await asyncio.sleep(0.05)  # the call is on the connection, held by the pause
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await connection.run_script(script, ["after"], []) == 1
        assert await redis.get("cancelled") == b"1", "a submitted call was withdrawn"


async def test_cancelling_one_caller_while_connecting_leaves_the_others_their_connection(
    real_redis: aioredis.Redis,
) -> None:
    script = real_redis.register_script(ECHO)
    async with connection_to(REDIS_URL) as connection:
        first = asyncio.create_task(connection.run_script(script, ["a"], ["1", 1]))
        second = asyncio.create_task(connection.run_script(script, ["b"], ["2", 2]))
        await asyncio.sleep(0)  # both are waiting for the connection now
        first.cancel()
        assert await second == [b"b", b"2", 4]
        with pytest.raises(asyncio.CancelledError):
            await first


@pytest.mark.slow
async def test_a_late_batch_on_the_script_connection_is_still_decided() -> None:
    """The tracker's deadline passes while Redis holds the batches: the requests get
    LateReply, and their views are still decided by the script once Redis answers."""
    async with private_redis() as (redis, url), connection_to(url) as connection:
        settings = Settings(redis_url=url, redis_timeout=0.2)
        tracker = ViewTracker(
            redis, None, settings, clock=FakeClock(), script_connection=connection
        )
        assert (await tracker.track_view("story", "1", "user:0")).counted
        await redis.client_pause(1000, all=False)
        views = []
        for user in range(1, 7):  # one batch per view: four in flight, then a queue
            views.append(asyncio.create_task(tracker.track_view("story", "1", f"user:{user}")))
            for _ in range(10):
                await asyncio.sleep(0)
        outcomes = await asyncio.gather(*views, return_exceptions=True)
        assert all(isinstance(o, LateReply) for o in outcomes), outcomes
        async with asyncio.timeout(30):
            await tracker.drain()
        assert await redis.get("story:views:1") == b"7", "a late view was never decided"


async def test_views_are_counted_alike_on_both_transports(real_redis: aioredis.Redis) -> None:
    """Many concurrent views through the tracker, once on redis-py and once on the script
    connection: the same outcomes, the same counts.

    Several batches may be in flight at once, so which of a viewer's two views of a story is
    decided first (counted) and which second (cooldown) may differ between the runs: the
    outcomes are compared per (story, viewer), not per position."""
    connection = ScriptConnection.from_url(REDIS_URL)
    outcomes = []
    try:
        for prefix, transport in (("a:", None), ("b:", connection)):
            tracker = ViewTracker(
                real_redis,
                None,
                # Hundreds of views at once on a busy machine: no deadline may cut them short.
                Settings(key_prefix=prefix, redis_timeout=30.0),
                clock=FakeClock(),
                script_connection=transport,
            )
            results = await asyncio.gather(
                *(tracker.track_view("story", str(n % 7), f"user:{n % 40}") for n in range(400))
            )
            outcomes.append(
                Counter((n % 7, n % 40, r.counted, r.reason) for n, r in enumerate(results))
            )
    finally:
        assert connection is not None
        await connection.aclose()
    assert outcomes[0] == outcomes[1]
    assert sum(n for (*_, counted, _), n in outcomes[0].items() if counted) == 7 * 40
    for story in range(7):
        assert await real_redis.get(f"a:story:views:{story}") == await real_redis.get(
            f"b:story:views:{story}"
        )


async def test_a_closed_connection_refuses_calls(real_redis: aioredis.Redis) -> None:
    async with connection_to(REDIS_URL) as connection:
        assert await connection.execute(("PING",)) == b"PONG"
    with pytest.raises(RedisConnectionError):
        await connection.execute(("PING",))


async def test_the_built_tracker_sends_views_on_a_script_connection() -> None:
    tracker = build_tracker(Settings(redis_url=REDIS_URL, database_url="sqlite+aiosqlite://"))
    try:
        assert tracker.script_connection is not None
    finally:
        await tracker.redis.aclose()
        assert tracker.store is not None
        await tracker.store.close()
        await tracker.script_connection.aclose()
    embedded = build_tracker(Settings(database_url="sqlite+aiosqlite://"))
    try:
        assert embedded.script_connection is None  # fakeredis in-process: redis-py's path
    finally:
        await embedded.redis.aclose()
        assert embedded.store is not None
        await embedded.store.close()


async def test_a_slow_redis_that_keeps_answering_is_not_dropped() -> None:
    """The watchdog looks for any reply, not for each call's: a backlog that Redis works
    through, reply after reply, outlives the timeout as a whole."""

    async def answer(command: list[bytes]) -> bytes:
        await asyncio.sleep(0.1)
        return b"+OK\r\n"

    async with (
        fake_server(answer) as (port, _),
        connection_to(f"redis://127.0.0.1:{port}/0", reply_timeout=0.5) as connection,
    ):
        replies = await asyncio.gather(*(connection.execute(("PING",)) for _ in range(12)))
    assert replies == [b"OK"] * 12


async def test_a_connection_killed_under_load_loses_no_reported_view(
    real_redis: aioredis.Redis,
) -> None:
    """Redis drops the connection while batches are in flight: every request ends (counted,
    or a Redis failure), every view reported counted is in Redis, no view is counted twice, and
    the next view finds a new connection."""
    connection = ScriptConnection.from_url(REDIS_URL)
    assert connection is not None
    tracker = ViewTracker(
        real_redis,
        None,
        Settings(redis_timeout=30.0),  # a late reply is not what this test is about
        clock=FakeClock(),
        script_connection=connection,
    )
    try:
        assert (await tracker.track_view("story", "0", "user:0")).counted
        client_id = await connection.execute(("CLIENT", "ID"))

        async def view(n: int) -> bool | None:
            try:
                return (await tracker.track_view("story", "1", f"user:{n}")).counted
            except RedisConnectionError:
                return None

        views = []
        for n in range(1, 401):
            views.append(asyncio.create_task(view(n)))
            if n % 50 == 0:
                await asyncio.sleep(0)  # a batch leaves every 50 views
            if n == 200:
                await real_redis.client_kill_filter(_id=client_id)
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*views)
        counted = outcomes.count(True)
        failed = outcomes.count(None)
        assert counted + failed == 400 and counted > 0
        stored = int(await real_redis.get("story:views:1") or 0)
        # A failed view may or may not have run (its reply was lost), never twice.
        assert counted <= stored <= counted + failed
        assert (await tracker.track_view("story", "2", "user:1")).counted
    finally:
        await connection.aclose()


async def test_a_refused_script_load_leaves_the_call_its_own_reply() -> None:
    """NOSCRIPT, then SCRIPT LOAD refused (BUSY) while the call sent after it ran (another
    client loaded the script meanwhile): the call's reply, not the load's refusal, is its
    outcome, so a call that ran is never taken for one that never did."""
    replies = iter([b"-NOSCRIPT No matching script.\r\n", b"-BUSY Redis is busy.\r\n", b":1\r\n"])

    async def answer(command: list[bytes]) -> bytes:
        return next(replies)

    script = aioredis.Redis().register_script("return 1")
    async with (
        fake_server(answer) as (port, received),
        connection_to(f"redis://127.0.0.1:{port}/0") as connection,
    ):
        assert await connection.run_script(script, ["k"], []) == 1
    assert [command[0] for command in received] == [b"EVALSHA", b"SCRIPT", b"EVALSHA"]


async def test_a_call_on_a_connection_that_just_ended_is_not_sent_and_never_hangs() -> None:
    pong = fake_server(lambda command: asyncio.sleep(0, b"+PONG\r\n"))
    async with pong as (port, received), connection_to(f"redis://127.0.0.1:{port}/0") as connection:
        protocol = await connection._ready()
        protocol.abort(RedisConnectionError("lost"))  # between the opening and the call
        with pytest.raises(NotSentError):
            connection._send(protocol, ("PING",))
        assert await connection.execute(("PING",)) == b"PONG"  # a new connection
    assert received == [[b"PING"]]
