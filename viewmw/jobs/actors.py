"""The actors: the guarded sync and the cleanup, on periodiq's schedule, and the failure path.

Both are idempotent: a redelivered or duplicated message finds the lock taken or nothing pending,
and the ledger makes a batch count once whatever happens. They listen on the queue named by
``VIEWMW_QUEUE_NAME`` (by default derived from the key prefix), so the workers of apps that share
a broker each take only their own app's messages.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import dramatiq

from viewmw.connections import redis_for_background
from viewmw.errors import LockLostError
from viewmw.jobs.broker import broker, settings, worker_settings
from viewmw.jobs.notify import notify_failure
from viewmw.outage.replayer import replay_outbox
from viewmw.store import Store
from viewmw.sync import ViewSync
from viewmw.tracker import ViewTracker

logger = logging.getLogger("viewmw.jobs")

QUEUE = worker_settings.queue_name


async def _run(*, force: bool, cleanup_only: bool) -> dict[str, Any]:
    redis = redis_for_background(settings)
    store = Store.from_settings(settings)
    try:
        sync = ViewSync(redis, store, settings)
        if cleanup_only:
            return {"cleaned_keys": await sync.cleanup()}
        # Views kept in the outbox during a Redis outage, by any web process (even one that is
        # gone), go through the rules before the sync moves counts.
        replayed = await replay_outbox(ViewTracker(redis, store, settings, pipelining=False))
        try:
            report = await sync.run(force=force)
        except LockLostError as exc:
            # Not retried (see ``throws``): the sync that took the lock over does the work.
            logger.warning("the sync lost its lock and stopped without committing: %s", exc)
            raise
        for message in report.refused.values():
            # Views wait in Redis until the declarations agree: make it stand out in the log.
            logger.error("%s", message)
        if report.already_running:
            logger.info("another sync is running; this message has nothing to do")
        return {**asdict(report), "replayed": replayed.events}
    finally:
        await redis.aclose()
        await store.close()


@dramatiq.actor(
    broker=broker,
    queue_name=QUEUE,
    max_retries=3,
    min_backoff=worker_settings.retry_min_backoff_ms,
    time_limit=worker_settings.sync_time_limit_ms,
    on_retry_exhausted="notify_sync_failure",
    throws=(LockLostError,),
    periodic=worker_settings.sync_schedule,
)
async def sync_view_counts(force: bool = False) -> dict[str, Any]:
    """Run the guarded sync; raised errors are retried (3 times, with backoff), but for a lost
    lock: that message fails at once, as the sync holding the lock now finishes the work."""
    return await _run(force=force, cleanup_only=False)


@dramatiq.actor(
    broker=broker,
    queue_name=QUEUE,
    max_retries=3,
    min_backoff=worker_settings.retry_min_backoff_ms,
    periodic=worker_settings.cleanup_schedule,
)
async def cleanup_view_tracking() -> dict[str, Any]:
    """Delete previous days' daily counters (skipped while a sync batch is unsettled)."""
    return await _run(force=False, cleanup_only=True)


@dramatiq.actor(broker=broker, queue_name=QUEUE, max_retries=0)
def notify_sync_failure(message: dict[str, Any], retries: dict[str, Any]) -> None:
    """Final failure of a sync: log at ERROR and call the configured hook once."""
    details = {
        "actor": message.get("actor_name"),
        "message_id": message.get("message_id"),
        "retries": retries.get("retries"),
        "error": _exception_line(message.get("options", {}).get("traceback", "")),
    }
    logger.error(
        "view count sync failed after %s retries: %s", details["retries"], details["error"]
    )
    notify_failure(worker_settings.failure_hook, details)


def _exception_line(traceback_text: str) -> str:
    """The first line of the exception a formatted traceback ends with.

    Not simply the last line: exceptions such as SQLAlchemy's end with several lines of detail
    (``[SQL: …]``, ``(Background on this error at: …)``).
    """
    lines = traceback_text.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("  File "):
            rest = [line for line in lines[index + 1 :] if not line.startswith("    ")]
            return rest[0] if rest else lines[-1]
    return lines[-1] if lines else ""
