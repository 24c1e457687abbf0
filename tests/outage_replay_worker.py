"""A replayer to kill: replays the outage outbox and stops for good after chunk ``PAUSE_AT``
reached Redis, before that chunk is deleted from the outbox.

    python tests/outage_replay_worker.py REDIS_URL DATABASE_URL CHUNK PAUSE_AT

When it stops it prints ``paused`` and sleeps, so that a test can ``kill -9`` it at exactly that
point. It imports nothing from the tests: the test suite's slot (its Redis database and PostgreSQL
database) is the one the URLs name.
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import create_async_engine

from viewmw import Outbox, Replayer, Settings, ViewTracker


async def main(redis_url: str, database_url: str, chunk: int, pause_at: int) -> None:
    steps = 0

    async def on_step(name: str) -> None:
        nonlocal steps
        steps += 1
        if steps == pause_at:
            print("paused", flush=True)
            await asyncio.sleep(3600)  # the test kills this process here

    redis = aioredis.Redis.from_url(redis_url)
    engine = create_async_engine(database_url)
    tracker = ViewTracker(redis, None, Settings(redis_url=redis_url, redis_timeout=30.0))
    await Replayer(tracker, Outbox(engine), chunk=chunk, on_step=on_step).replay()
    print("finished without pausing", flush=True)


if __name__ == "__main__":
    redis_url, database_url, chunk, pause_at = sys.argv[1:5]
    asyncio.run(main(redis_url, database_url, int(chunk), int(pause_at)))
