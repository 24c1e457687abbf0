"""Loaded into a real ``dramatiq viewmw.jobs`` worker by ``test_worker_e2e``: holds the sync at
one step.

With ``VIEWMW_TEST_PAUSE_AT=step`` or ``step:n``, the n-th time the sync reaches ``step`` (a step
boundary of :class:`viewmw.sync.ViewSync`: ``snapshot``, ``before_commit``, ``committed``,
``settle``…) the worker sets :data:`PAUSED_KEY` in Redis and waits there, so the test can SIGKILL
it at a known point of a sync. Every Redis call and database transaction of the sync is atomic, so
its step boundaries are the states a crash can leave behind. Without the variable this does nothing.
"""

from __future__ import annotations

import asyncio
import functools
import os

from redis.asyncio import Redis

import viewmw.jobs.actors
from viewmw.sync import ViewSync

PAUSED_KEY = "viewmw-test:paused"


def install(spec: str) -> None:
    """Make the actors' syncs pause at ``spec`` (``step`` or ``step:n``)."""
    step, _, nth = spec.partition(":")
    wanted = int(nth or 1)
    seen = 0

    async def on_step(name: str) -> None:
        nonlocal seen
        if name != step:
            return
        seen += 1
        if seen != wanted:
            return
        client = Redis.from_url(os.environ["VIEWMW_REDIS_URL"])
        try:
            await client.set(PAUSED_KEY, spec)
        finally:
            await client.aclose()
        await asyncio.sleep(3600)  # until the test kills this process

    setattr(viewmw.jobs.actors, "ViewSync", functools.partial(ViewSync, on_step=on_step))  # noqa: B010


if os.environ.get("VIEWMW_TEST_PAUSE_AT"):
    install(os.environ["VIEWMW_TEST_PAUSE_AT"])
