"""Auto-pipelining: script calls made by concurrent requests travel to Redis together.

Each call is queued; the queue is sent as one pipeline (one write, one read) at the end of the
current event-loop turn, so a lone call leaves at once and a burst of concurrent requests shares a
round trip. While ``max_in_flight`` pipelines are waiting for Redis, new calls gather and leave as
the next pipeline, which keeps batches large under load and the connection count small.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

logger = logging.getLogger("viewmw")


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]


class AutoPipeline:
    """Sends concurrent script calls to Redis in shared pipelines.

    Args:
        redis: the client whose connection pool the pipelines use.
        max_batch: most calls in one pipeline.
        max_in_flight: most pipelines waiting for Redis at once.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 256, max_in_flight: int = 4) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.redis = redis
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[_Call] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script`` with ``keys`` and ``args`` and return its reply (or raise its error).

        Cancelling the caller abandons its reply; the call itself is still sent and run.
        """
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._queue.append(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await call.future

    async def drain(self) -> None:
        """Wait until every call queued so far has been sent and its reply read (at shutdown, a
        caller that stopped waiting still has its script run)."""
        while self._queue or self._tasks:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # a flush is scheduled for this loop turn

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            # Calls whose caller stopped waiting (a late reply) are sent all the same: the view was
            # offered, and only the script Redis runs may decide it.
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._execute(batch)
        except BaseException as exc:  # delivered to every caller of the batch, never lost
            for call in batch:
                _deliver(call, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for call, reply in zip(batch, replies, strict=True):
                _deliver(call, reply)
        finally:
            self._in_flight -= 1
            if self._queue and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        replies = await self._pipeline(batch)
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted or its script cache was flushed: load the scripts and retry those.
            for script in {id(batch[n].script): batch[n].script for n in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            retried = await self._pipeline([batch[n] for n in missing])
            for n, reply in zip(missing, retried, strict=True):
                replies[n] = reply
        return replies

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))


def _deliver(call: _Call, reply: Any) -> None:
    if call.future.done():
        return
    if isinstance(reply, asyncio.CancelledError):
        call.future.cancel()
    elif isinstance(reply, BaseException):
        call.future.set_exception(reply)
    else:
        call.future.set_result(reply)
