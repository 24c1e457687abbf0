"""A batch's views on a cluster go to their content shards in separate calls (no Redis here: the
calls are answered by the test), each shard's replies handed over as soon as its call returns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from viewmw.scripts import Scripts
from viewmw.sharded_recording import ShardedRecording, ViewCall
from viewmw.shards import ContentShards

SHARDS = ContentShards(count=4)


def _calls(count: int) -> list[ViewCall]:
    # Only the member (the sixth argument) matters here: it names the view's content shard.
    return [((), (None,) * 5 + (f"story:{n}",) + (None,) * 7, None) for n in range(count)]


def _recording(answer: Any) -> ShardedRecording:
    scripts = cast(Scripts, SimpleNamespace(record_views=None))
    return ShardedRecording(None, scripts, SHARDS, [], None, run=answer)


def _one_reply_per_view(outcome: Any, views: int) -> list[Any]:
    return [outcome] * views


async def test_each_shards_replies_are_handed_over_when_its_call_returns() -> None:
    slow_epoch = SHARDS.of("story", "0").epoch
    back = asyncio.Event()
    handed: list[tuple[list[int], list[Any]]] = []

    async def answer(_script: Any, keys: Sequence[Any], _args: Sequence[Any]) -> Any:
        if keys[1] == slow_epoch:
            await back.wait()
            return "slow"
        return "quick"

    calls = _calls(24)
    slow = [n for n in range(24) if SHARDS.of("story", str(n)).epoch == slow_epoch]
    quick_shards = len({SHARDS.index("story", str(n)) for n in range(24)}) - 1
    quick_done = asyncio.Event()

    def hand_over(positions: Sequence[int], replies: Sequence[Any]) -> None:
        handed.append((list(positions), list(replies)))
        if len(handed) == quick_shards:
            quick_done.set()

    sending = asyncio.create_task(_recording(answer).send(calls, _one_reply_per_view, hand_over))
    try:
        async with asyncio.timeout(30):  # held back with the slow shard, they would never come
            await quick_done.wait()
        quick = sorted(position for positions, _ in handed for position in positions)
        assert quick == [n for n in range(24) if n not in slow]
        assert all(reply == "quick" for _, replies in handed for reply in replies)
    finally:
        back.set()
        replies = await sending
    assert handed[-1] == (slow, ["slow"] * len(slow))
    assert replies == ["slow" if n in slow else "quick" for n in range(24)]


async def test_a_hand_over_that_fails_loses_no_reply(caplog: pytest.LogCaptureFixture) -> None:
    async def answer(_script: Any, _keys: Sequence[Any], _args: Sequence[Any]) -> Any:
        return "decided"

    def broken(_positions: Sequence[int], _replies: Sequence[Any]) -> None:
        raise RuntimeError("the requests could not be told")

    with caplog.at_level(logging.ERROR, logger="viewmw"):
        replies = await _recording(answer).send(_calls(12), _one_reply_per_view, broken)
    assert replies == ["decided"] * 12  # the batch still ends with every reply
    assert "handing" in caplog.text
