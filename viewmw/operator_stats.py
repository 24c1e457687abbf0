"""What an operator asks of a running deployment: the limits in force, how many tracking keys
exist, the sync backlog, the outage outbox and views kept for rows that do not exist.

Read with ``SCAN`` and a few SQL aggregates, never on the request path: ``viewmw sync --stats``
shows it, and it is the tracker's business only in that both read the same keys.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from viewmw.keys import KeySchema
from viewmw.outage.outbox import Outbox
from viewmw.settings import Settings
from viewmw.store import Store


async def abuse_stats(
    redis: Redis, settings: Settings, store: Store | None = None
) -> dict[str, Any]:
    """The limits, how many tracking keys exist (counted with ``SCAN``, never ``KEYS``), the
    contents waiting for a sync, and the last syncs from the ledger (``last_syncs``, newest
    first; empty without a store)."""
    limits = settings.limits
    keys = KeySchema(settings.key_prefix)
    return {
        "max_views_per_session": limits.max_views_per_session,
        "session_seconds": limits.session_seconds,
        "max_daily_views_per_user": limits.max_daily_views_per_user,
        "one_view_per_day": limits.one_view_per_day,
        "view_cooldown_seconds": limits.view_cooldown_seconds,
        "timezone": settings.timezone,
        "pending_view_keys": await _count_keys(redis, keys.pending_pattern),
        "session_keys": await _count_keys(redis, keys.session_pattern),
        "daily_limit_keys": await _count_keys(redis, keys.daily_views_pattern),
        "dirty_contents": await pending_contents(redis, settings),
        "last_syncs": await store.last_batches(5) if store else [],
    }


async def operator_stats(redis: Redis, settings: Settings, store: Store) -> dict[str, Any]:
    """:func:`abuse_stats`, plus the outage outbox (:meth:`Outbox.stats`) and the views kept
    for rows that do not exist (``unmatched_contents``, ``unmatched_views``)."""
    stats = await abuse_stats(redis, settings, store)
    stats.update(await Outbox(store.engine).stats())
    unmatched_contents, unmatched_views = await store.unmatched_totals()
    stats.update(unmatched_contents=unmatched_contents, unmatched_views=unmatched_views)
    return stats


async def pending_contents(redis: Redis, settings: Settings) -> int:
    """The contents the next sync will move: each content shard's dirty set and those a running
    sync took from it (one set of each on a single Redis; read in one pipeline either way)."""
    async with redis.pipeline(transaction=False) as pipe:
        for keys in settings.content_shards().schemas:
            pipe.scard(keys.dirty)
            pipe.scard(keys.draining)
        return sum(int(size) for size in await pipe.execute())


async def _count_keys(redis: Redis, pattern: str) -> int:
    return sum([1 async for _ in redis.scan_iter(match=pattern, count=1000)])
