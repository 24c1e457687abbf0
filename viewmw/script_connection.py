"""A dedicated Redis connection for the request path's script calls, lean on the client side.

redis-py spends more Python per call than the call itself needs: a pool checkout, a retry
wrapper, stream reader and writer layers, a health check. The views of one event-loop turn are
one ``EVALSHA`` of ``record_views``; this connection sends it as one hiredis-packed write on an
:class:`asyncio.Protocol` and parses replies with :class:`hiredis.Reader` as bytes arrive, one
future per call. Calls are pipelined: several may wait on the connection at once, and Redis
answers them in order.

Failures are redis-py's exceptions, so :func:`viewmw.failures.classify` sees what it would see
from redis-py: ``redis.ConnectionError`` when the connection cannot be made or is lost (every call
waiting on it gets one; none hangs), ``redis.TimeoutError`` when calls wait and Redis sends no
reply at all for ``reply_timeout`` (a backstop far above the request deadline: the connection is
then dropped, as redis-py drops a connection whose read timed out), ``redis.ResponseError`` for an
error reply, :class:`~viewmw.errors.MalformedReplyError` for bytes that are not RESP. A call whose
caller stops waiting (a late request, a cancelled task) is still read off the connection: its
reply is discarded, never another call's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from viewmw.errors import MalformedReplyError
from viewmw.failures import NotSentError, NotSentTimeoutError

logger = logging.getLogger("viewmw")

_ASKING = ("ASKING",)


class _ReplyProtocol(asyncio.Protocol):
    """Parses replies as they arrive and hands each to the oldest waiting call."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.failure: Exception | None = None  # why the connection ended, once it has
        self.replies = 0  # read so far: the watchdog's sign of life
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(MalformedReplyError(f"Redis sent bytes that are not RESP: {exc}"))
                return
            if reply is False:  # the rest of a reply is still on its way
                return
            if not waiters:
                self.abort(MalformedReplyError("Redis sent a reply nobody asked for"))
                return
            self.replies += 1
            waiter = waiters.popleft()
            if not waiter.done():  # done: its caller stopped waiting; the reply is dropped
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            reason = "Connection closed by server." if exc is None else f"Connection lost: {exc}"
            self.failure = RedisConnectionError(reason)
        self._fail_waiters()

    def abort(self, failure: Exception) -> None:
        """End the connection; every call waiting on it gets ``failure``."""
        if self.failure is None:
            self.failure = failure
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, on the next loop turn
        self._fail_waiters()

    def watch(self, loop: asyncio.AbstractEventLoop, timeout: float, address: str) -> None:
        """Drop the connection if calls wait and no reply at all comes for ``timeout`` seconds.

        One timer per connection, not one per call. A call that waits longer than ``timeout``
        fails after between one and two periods; one sent just before a period ends may fail
        sooner, but only because the calls ahead of it, whose replies must come first, waited
        the whole period.
        """
        self.watchdog = loop.call_later(timeout, self._check, loop, timeout, address, self.replies)

    def _check(
        self, loop: asyncio.AbstractEventLoop, timeout: float, address: str, replies: int
    ) -> None:
        self.watchdog = None
        if self.failure is not None or not self.waiters:
            return
        if self.replies != replies:
            self.watch(loop, timeout, address)
            return
        # Redis, not our loop, is slow: asyncio runs the reads that are ready before the timers
        # that are due, so a reply already in the socket would have been parsed by now.
        logger.debug("Redis at %s did not answer within %s s", address, timeout)
        self.abort(RedisTimeoutError(f"Timeout reading from {address} ({timeout} s)"))

    def _fail_waiters(self) -> None:
        waiters, failure = self.waiters, self.failure
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(failure or RedisConnectionError("Connection closed."))

    @property
    def usable(self) -> bool:
        transport = self.transport
        return self.failure is None and transport is not None and not transport.is_closing()


class ScriptConnection:
    """One Redis connection that runs script calls, pipelined, with hiredis on both sides.

    Opened on the first call and again after it is lost; never resends a call (a script whose
    reply was lost may have run). Create it with :meth:`from_url`; close it with :meth:`aclose`.

    Args:
        host: the TCP server's host (unless ``path`` is given).
        port: the TCP server's port.
        path: a Unix socket, instead of a TCP server.
        db: the database selected when the connection opens.
        username: authenticated when the connection opens (with ``password``).
        password: authenticated when the connection opens.
        connect_timeout: seconds to open the connection (then ``redis.TimeoutError``).
        reply_timeout: seconds Redis may go without a reply while calls wait before the
            connection is dropped (``redis.TimeoutError``); a backstop above the request
            deadline, checked by one timer per connection (see :meth:`_ReplyProtocol.watch`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 2.0,
        reply_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.db = db
        self.username = username
        self.password = password
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._protocol: _ReplyProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_ReplyProtocol] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, *, connect_timeout: float = 2.0, reply_timeout: float = 2.0
    ) -> ScriptConnection | None:
        """A connection for a ``redis://`` or ``unix://`` URL; ``None`` for other schemes (TLS
        connections stay with redis-py)."""
        if not url.startswith(("redis://", "unix://")):
            return None
        options = parse_url(url)
        if options.get("connection_class") is SSLConnection:
            return None
        return cls(
            options.get("host", "127.0.0.1"),
            int(options.get("port", 6379)),
            path=options.get("path"),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            connect_timeout=connect_timeout,
            reply_timeout=reply_timeout,
        )

    @property
    def address(self) -> str:
        """Where this connection goes, for messages."""
        return self.path if self.path is not None else f"{self.host}:{self.port}"

    async def run_script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], *, asking: bool = False
    ) -> Any:
        """``EVALSHA`` of ``script``; loads the script and runs it again if Redis lacks it
        (``NOSCRIPT``, after a restart or ``SCRIPT FLUSH``). ``asking``: the call follows a
        cluster node's ``ASK`` redirection, so ``ASKING`` goes right before it."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        before = (_ASKING,) if asking else ()
        if asking:
            reply = (await self._exchange(*before, command))[-1]
        else:
            reply = await self.execute(command)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            # All in one write: nothing can run between the load and the call on this
            # connection, so the call finds the script (and ASKING still comes right before it).
            # The call's own reply says what became of it: the load can be refused (BUSY,
            # LOADING) while the call, read later, finds the script another client loaded.
            loaded, *_, reply = await self._exchange(
                ("SCRIPT", "LOAD", script.script), *before, command
            )
            if not isinstance(loaded, ResponseError):
                script.sha = _sha(loaded)
        if isinstance(reply, ResponseError):
            if str(reply).startswith("NOSCRIPT"):
                raise NoScriptError(str(reply))
            raise reply
        return reply

    async def execute(self, command: Sequence[Any]) -> Any:
        """Send one command and return its reply; an error reply is returned, not raised."""
        protocol = self._protocol
        if protocol is None or not protocol.usable or self._loop is not asyncio.get_running_loop():
            protocol = await self._ready()
        (waiter,) = self._send(protocol, command)
        # Cancelling the caller cancels only its future: the reply is still read, and dropped.
        return await waiter

    async def _exchange(self, *commands: Sequence[Any]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order (error replies
        returned, not raised)."""
        waiters = self._send(await self._ready(), *commands)
        for waiter in waiters:  # whichever its caller no longer waits for
            waiter.add_done_callback(_retrieve)
        return [await waiter for waiter in waiters]

    def _send(
        self, protocol: _ReplyProtocol, *commands: Sequence[Any]
    ) -> list[asyncio.Future[Any]]:
        loop = self._loop
        assert loop is not None and protocol.transport is not None
        if not protocol.usable:
            # The connection ended between its opening and this call (its waiters were failed
            # already): nothing is written, and nothing would answer.
            raise NotSentError(f"the connection to {self.address} ended before the call was sent")
        if len(commands) == 1:
            packed = hiredis.pack_command(tuple(commands[0]))
        else:
            packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)
        waiters = [loop.create_future() for _ in commands]
        protocol.waiters.extend(waiters)
        protocol.transport.write(packed)
        if protocol.watchdog is None:
            protocol.watch(loop, self.reply_timeout, self.address)
        return waiters

    async def _ready(self) -> _ReplyProtocol:
        """The open connection, opened (and authenticated, and its database selected) if need be."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol is not None and protocol.usable and self._loop is loop:
            return protocol
        if self._closed:
            raise NotSentError("the script connection is closed")
        if self._loop is not loop:  # a new event loop (tests): the old connection is unusable
            self._protocol = self._connecting = None
            self._loop = loop
        if self._connecting is None or self._connecting.done():
            # Shielded: one caller giving up must not cancel the others' connection attempt.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _ReplyProtocol:
        loop = asyncio.get_running_loop()
        protocol = _ReplyProtocol()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path is not None:
                    await loop.create_unix_connection(lambda: protocol, self.path)
                else:
                    await loop.create_connection(lambda: protocol, self.host, self.port)
                await self._handshake(protocol)
        except TimeoutError:
            protocol.abort(NotSentTimeoutError(f"Timeout connecting to {self.address}"))
            raise protocol.failure from None  # type: ignore[misc]
        except OSError as exc:
            protocol.abort(NotSentError(f"Error connecting to {self.address}: {exc}"))
            raise protocol.failure from None  # type: ignore[misc]
        except BaseException as exc:
            protocol.abort(exc if isinstance(exc, Exception) else RedisConnectionError("closed"))
            raise
        if self._closed:  # closed while connecting
            protocol.abort(NotSentError("the script connection is closed"))
            raise protocol.failure  # type: ignore[misc]
        self._protocol = protocol
        return protocol

    async def _handshake(self, protocol: _ReplyProtocol) -> None:
        commands: list[tuple[Any, ...]] = []
        if self.password is not None:
            credentials = (
                (self.password,) if self.username is None else (self.username, self.password)
            )
            commands.append(("AUTH", *credentials))
        if self.db:
            commands.append(("SELECT", self.db))
        if not commands:
            return
        for command, waiter in zip(commands, self._send(protocol, *commands), strict=True):
            reply = await waiter
            if isinstance(reply, ResponseError):
                if command[0] == "AUTH":
                    raise AuthenticationError(str(reply))
                raise RedisConnectionError(f"{command[0]} failed: {reply}")

    async def aclose(self) -> None:
        """Close the connection; calls still waiting get ``redis.ConnectionError``."""
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.failure = protocol.failure or RedisConnectionError("connection closed")
            protocol.transport.close()
            protocol.connection_lost(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a connection attempt's failure as seen: its callers got it, or gave up waiting."""
    if not future.cancelled():
        future.exception()


def _sha(reply: Any) -> str:
    if isinstance(reply, bytes):
        return reply.decode("ascii")
    if isinstance(reply, ResponseError):
        raise reply
    raise MalformedReplyError(f"unexpected reply to SCRIPT LOAD: {reply!r:.80}")
