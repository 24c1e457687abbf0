"""Replays the outbox: views kept during a Redis outage go through the recording script.

Oldest first, with their original times, so the rules are decided as if Redis had been up all
along — with one difference: live views that reached Redis after it came back may have been
decided before older replayed ones (see docs/outages.md).

Exactly once: each replayed event sets a marker in the same script call that decides it, and is
deleted from the outbox only after Redis answered. A replayer killed between the two finds the
events again, and the markers make their second replay a no-op. Several replayers at once (web
processes and the worker) are safe for the same reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from viewmw.errors import InvalidKeyError
from viewmw.keys import validate_content_id, validate_content_type, validate_viewer
from viewmw.outage.outbox import Outbox, OutboxEvent
from viewmw.tracker import ViewTracker

logger = logging.getLogger("viewmw")


@dataclass(slots=True)
class ReplayReport:
    """What one replay did: events decided (``counted`` of them counted), and events an earlier
    replay had already decided (``already_replayed``)."""

    events: int = 0
    counted: int = 0
    already_replayed: int = 0


class Replayer:
    """Drains an :class:`~viewmw.outage.outbox.Outbox` into Redis.

    Args:
        tracker: the Redis tracker whose script decides the events.
        outbox: where the events wait.
        chunk: events per pipeline (and per delete).
        on_step: awaited with ``"replayed"`` after each chunk reached Redis and before it is
            deleted (tests inject failures there).
    """

    def __init__(
        self,
        tracker: ViewTracker,
        outbox: Outbox,
        *,
        chunk: int = 500,
        on_step: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.tracker = tracker
        self.outbox = outbox
        self.chunk = chunk
        self.on_step = on_step

    async def replay(self) -> ReplayReport:
        """Replay until the outbox is empty.

        Raises:
            redis.RedisError, sqlalchemy.exc.SQLAlchemyError: a server failed; nothing is lost
                and nothing counts twice: the next replay carries on.
        """
        report = ReplayReport()
        while events := await self.outbox.oldest(self.chunk):
            valid = [event for event in events if _is_valid(event)]
            if len(valid) < len(events):
                # Only viewmw writes the outbox; a row it cannot read would block every replay.
                logger.error("dropping %d unreadable outbox rows", len(events) - len(valid))
            outcomes = await self.tracker.replay(valid) if valid else []
            if self.on_step is not None:
                await self.on_step("replayed")
            await self.outbox.remove(event.event_id for event in events)
            report.events += len(events)
            report.counted += sum(1 for outcome in outcomes if outcome)
            report.already_replayed += sum(1 for outcome in outcomes if outcome is None)
        if report.events:
            logger.warning(
                "replayed %d views kept during a Redis outage: %d counted",
                report.events,
                report.counted,
            )
        return report


async def replay_outbox(tracker: ViewTracker) -> ReplayReport:
    """Replay whatever the outbox of ``tracker``'s database holds (the worker and ``viewmw sync``
    run this before every sync, so the outbox drains even if the process that wrote it is gone).
    """
    if tracker.store is None:
        return ReplayReport()
    return await Replayer(tracker, Outbox(tracker.store.engine)).replay()


def _is_valid(event: OutboxEvent) -> bool:
    try:
        validate_content_type(event.content_type)
        validate_content_id(event.content_id)
        validate_viewer(event.viewer)
    except InvalidKeyError:
        return False
    return True
