"""Batching: what concurrent requests ask of Redis in one event-loop turn travels together.

Each request submits an item and awaits its future. The items queued during one loop turn are
sent together at the end of it (one call for the whole batch), so a lone request leaves at once
and a burst shares one round trip. While ``max_in_flight`` batches wait for Redis, new items
gather and leave as the next batch, which keeps batches large under load and the connection
count small.

The items of one loop turn share one deadline (``deadline`` seconds after the first was
submitted) instead of a timeout per request: when it passes, the requests still waiting get
:class:`LateReply` and move on. The batch itself is never withdrawn: an item once submitted is
sent and its reply read, because for a view only the script Redis runs may decide it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

logger = logging.getLogger("viewmw")

T = TypeVar("T")
R = TypeVar("R")


class LateReply(TimeoutError):
    """The batch's deadline passed before Redis' reply was read: the outcome is unknown."""


Early = Callable[[Sequence[int], Sequence[Any]], None]
"""Hands some items' replies (or errors) to their requests before the rest of the batch is back:
their positions in the batch, and a reply for each."""


class Batcher(Generic[T, R]):
    """Sends the items submitted in one event-loop turn as one batch.

    Args:
        send: sends a batch and returns one reply per item, in order (or raises for all). It
            may hand some replies over earlier through its second argument (a batch that
            travels as several calls, one per Redis Cluster shard, say): their requests go on
            without waiting for the slowest call.
        deadline: seconds a request waits for its batch's reply (``None``: no deadline).
        max_batch: most items in one batch.
        max_in_flight: most batches waiting for Redis at once.
    """

    def __init__(
        self,
        send: Callable[[list[T], Early], Awaitable[Sequence[R]]],
        *,
        deadline: float | None = None,
        max_batch: int = 256,
        max_in_flight: int = 4,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.send = send
        self.deadline = deadline
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._undated: list[asyncio.Future[R]] = []  # submitted since the last flush
        self._oldest = 0.0
        self._turns: deque[list[float]] = deque()  # [submitted at, items left] per loop turn
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.longest_queued = 0.0
        """The longest an item waited in this process before its batch left (seconds): what a
        crash of the process could lose of views that nobody waited for."""

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves to its reply, its error, or :class:`LateReply`.

        Cancelling the future abandons the reply; the item is still sent.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._undated:
            self._oldest = loop.time()
            self._turns.append([self._oldest, 0])
        self._turns[-1][1] += 1
        self._items.append(item)
        self._futures.append(future)
        self._undated.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    @property
    def backlogged(self) -> bool:
        """Whether a full batch is waiting for a batch in flight to come back."""
        return len(self._items) >= self.max_batch

    async def drain(self) -> None:
        """Wait until every item submitted so far has been sent and its reply read."""
        while self._items or self._tasks:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # a flush is scheduled for this loop turn

    def _flush(self) -> None:
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        if self._undated:
            # One deadline for everything submitted in this loop turn, whether it leaves now or
            # has to wait for a batch in flight to come back.
            if self.deadline is not None:
                loop.call_at(self._oldest + self.deadline, _expire, self._undated)
            self._undated = []
        while self._items and self._in_flight < self.max_in_flight:
            items, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
            self._note_queue_time(loop.time(), len(items))
            futures, self._futures = (
                self._futures[: self.max_batch],
                self._futures[self.max_batch :],
            )
            self._in_flight += 1
            task = loop.create_task(self._send(items, futures))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _note_queue_time(self, now: float, leaving: int) -> None:
        """Account for ``leaving`` items, oldest first, in :attr:`longest_queued`."""
        self.longest_queued = max(self.longest_queued, now - self._turns[0][0])
        while leaving:
            turn = self._turns[0]
            taken = min(leaving, int(turn[1]))
            turn[1] -= taken
            leaving -= taken
            if not turn[1]:
                self._turns.popleft()

    async def _send(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        def early(positions: Sequence[int], replies: Sequence[Any]) -> None:
            for position, reply in zip(positions, replies, strict=True):
                _deliver(futures[position], reply)

        try:
            replies = await self.send(items, early)
        except BaseException as exc:  # delivered to every request of the batch, never lost
            for future in futures:
                _deliver(future, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for future, reply in zip(futures, replies, strict=True):
                _deliver(future, reply)
        finally:
            self._in_flight -= 1
            if self._items and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)


def _expire(futures: list[asyncio.Future[Any]]) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(LateReply())


def _deliver(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return  # late, or the request went away
    if isinstance(reply, asyncio.CancelledError):
        future.cancel()
    elif isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]
"""A script, its keys and its arguments."""


def script_pipeline(redis: Redis) -> Callable[[list[ScriptCall], Early], Awaitable[list[Any]]]:
    """A ``send`` for :class:`Batcher` that runs script calls in one pipeline (one write, one
    read); a call's error is its own reply. Scripts missing from Redis' cache (after a restart or
    ``SCRIPT FLUSH``) are loaded and only the failed calls are sent again."""

    async def send(batch: list[ScriptCall], _early: Early) -> list[Any]:
        replies = await _pipeline(redis, batch)  # one reply for all: nothing comes early
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(batch[n][0]): batch[n][0] for n in missing}.values():
                script.sha = await redis.script_load(script.script)
            retried = await _pipeline(redis, [batch[n] for n in missing])
            for n, reply in zip(missing, retried, strict=True):
                replies[n] = reply
        return replies

    return send


async def _pipeline(redis: Redis, batch: list[ScriptCall]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
