"""The batcher hands a batch's replies to their requests: early ones as soon as the send says so,
the rest when the batch is back, and a failure of the whole send only to those still waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from viewmw.pipeline import Batcher, Early


class _TwoPartSend:
    """A send that answers the even items at once and the odd ones when ``rest`` is set."""

    def __init__(self, *, fail_rest: bool = False) -> None:
        self.rest = asyncio.Event()
        self.fail_rest = fail_rest

    async def __call__(self, items: list[int], early: Early) -> Sequence[str]:
        evens = [n for n, item in enumerate(items) if item % 2 == 0]
        early(evens, [f"early {items[n]}" for n in evens])
        await self.rest.wait()
        if self.fail_rest:
            raise ConnectionError("the rest of the batch failed")
        return [f"late {item}" for item in items]


async def test_replies_handed_early_reach_their_requests_before_the_batch_is_back() -> None:
    send = _TwoPartSend()
    batcher: Batcher[int, str] = Batcher(send)
    futures = [batcher.submit(item) for item in range(6)]
    try:
        async with asyncio.timeout(30):  # held back with the rest, they would never come
            firsts = await asyncio.gather(*futures[0::2])
        assert firsts == ["early 0", "early 2", "early 4"]
        assert not any(future.done() for future in futures[1::2])
    finally:
        send.rest.set()
        await batcher.drain()
    assert [future.result() for future in futures] == [
        "early 0",
        "late 1",
        "early 2",
        "late 3",
        "early 4",
        "late 5",
    ]


async def test_a_send_that_fails_after_early_replies_fails_only_the_requests_still_waiting() -> (
    None
):
    send = _TwoPartSend(fail_rest=True)
    batcher: Batcher[int, str] = Batcher(send)
    futures = [batcher.submit(item) for item in range(4)]
    send.rest.set()
    await batcher.drain()
    assert [futures[0].result(), futures[2].result()] == ["early 0", "early 2"]
    for future in futures[1::2]:
        with pytest.raises(ConnectionError):
            future.result()
