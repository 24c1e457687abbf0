"""Where each content type's counts go, as the app runs it: recorded in Redis, checked by the sync.

The app, ``viewmw sync`` and the worker each build their own :class:`~viewmw.store.Store`. Should
their mappings differ (the app maps ``story`` to ``stories.view_count`` in code, the command reads
a ``VIEWMW_CONTENT_TABLES`` that does not), the sync would move views into a table the app never
reads. So the app records its mapping at start-up (:func:`record_mapping`), and every sync compares
its own with it (:func:`mapping_conflicts`): a type the two place differently is refused, its
views left pending, with an error that names both places.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from viewmw.keys import KeySchema
from viewmw.store import Store, view_counts

logger = logging.getLogger("viewmw")

# The field holding where unmapped types go; content types start with a letter, so no type
# can be called this.
GENERIC_FIELD = ":generic"


def destinations(store: Store) -> dict[str, str]:
    """The mapping ``store`` writes with: each mapped type -> ``table.column``, and
    :data:`GENERIC_FIELD` -> the generic table that takes every other type."""
    return {GENERIC_FIELD: view_counts.name, **store.destinations()}


async def record_mapping(
    redis: Redis, keys: KeySchema, store: Store, *, wait_seconds: float = 5.0
) -> bool:
    """Record in Redis where the app counts each content type; returns whether it was recorded.

    Call it once at the app's start-up (the middleware does, for a tracker it builds). Never
    raises, and waits at most ``wait_seconds``: an app starts whether or not Redis answers,
    and the next start records it.
    """
    try:
        async with asyncio.timeout(wait_seconds), redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.mapping)
            pipe.hset(keys.mapping, mapping=destinations(store))  # type: ignore[arg-type]
            await pipe.execute()
    except Exception:
        logger.warning("viewmw: could not record the content table mapping in Redis", exc_info=True)
        return False
    return True


async def mapping_conflicts(redis: Redis, keys: KeySchema, store: Store) -> dict[str, str]:
    """Content types that ``store`` would write somewhere else than the app recorded, each with
    an error naming both places. Empty when the app recorded nothing (an older app, or a
    tracker the app built itself without calling :func:`record_mapping`)."""
    recorded = {_text(k): _text(v) for k, v in (await redis.hgetall(keys.mapping)).items()}
    if not recorded:
        return {}
    ours = destinations(store)
    app_generic = recorded.pop(GENERIC_FIELD, view_counts.name)
    our_generic = ours.pop(GENERIC_FIELD)
    conflicts: dict[str, str] = {}
    for content_type in sorted(set(recorded) | set(ours)):
        app_place = recorded.get(content_type, app_generic)
        our_place = ours.get(content_type, our_generic)
        if app_place != our_place:
            conflicts[content_type] = _conflict(
                content_type, app_place, our_place, mapped_by_app=content_type in recorded
            )
    return conflicts


def _conflict(content_type: str, app_place: str, our_place: str, *, mapped_by_app: bool) -> str:
    fix = (
        f"declare {content_type}={app_place} in VIEWMW_CONTENT_TABLES (or in the module named by "
        "VIEWMW_CONTENT_TABLES_MODULE) where the sync runs"
        if mapped_by_app
        else f"map {content_type!r} in the app too, or drop it from this sync's content tables"
    )
    return (
        f"not syncing content type {content_type!r}: the app counts it in {_place(app_place)}, "
        f"but this sync would move its views into {_place(our_place)}. Its views stay pending; "
        f"{fix}."
    )


def _place(target: str) -> str:
    return f"{target} (the generic table)" if target == view_counts.name else target


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
