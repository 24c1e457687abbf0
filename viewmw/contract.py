"""The tracker contract: what recording a view returns, and what the middleware needs of a
tracker. :class:`~viewmw.ViewTracker` and :class:`~viewmw.ResilientTracker` both fulfil it, so the
middleware and the request-facing API never ask which one they hold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from viewmw.settings import Settings


class BlockReason(StrEnum):
    """Why a view was not counted, in the order the rules are checked."""

    COOLDOWN = "cooldown"
    VIEWED_TODAY = "viewed_today"
    SESSION_LIMIT = "session_limit"
    DAILY_LIMIT = "daily_limit"


@dataclass(frozen=True, slots=True)
class ViewCount:
    """The parts of one content's count. ``total`` is what ``X-View-Count`` shows."""

    database: int
    pending: int
    syncing: int

    @property
    def total(self) -> int:
        """database + pending + syncing."""
        return self.database + self.pending + self.syncing


@dataclass(frozen=True, slots=True)
class TrackResult:
    """The outcome of :meth:`ViewTracker.track_view`.

    Attributes:
        counted: whether this view was counted.
        reason: the first rule that blocked it, or ``None`` when counted (or only read).
        count: the combined count after this view, or ``None`` when the database count could not
            be read (the view itself is still recorded).
        queued: Redis was unreachable and the view was durably written to the outage outbox; the
            rules decide it when it is replayed.

    ``counted`` and ``queued`` both false with no ``reason`` means the outcome is unknown (Redis'
    reply came too late): the script Redis runs decides that view, no other path does.
    """

    counted: bool
    reason: BlockReason | None
    count: ViewCount | None
    queued: bool = False


class RequestTracker(Protocol):
    """What the middleware needs of a tracker: :class:`~viewmw.ViewTracker` and
    :class:`~viewmw.outage.failover.ResilientTracker` both provide it."""

    @property
    def settings(self) -> Settings:
        """Limits, time zone, timeouts."""
        ...

    @property
    def clock(self) -> Callable[[], float]:
        """Seconds since the epoch (tests inject one); the viewer keys follow its calendar day."""
        ...

    async def track_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> TrackResult:
        """Offer one view (names already validated) to the abuse rules."""
        ...

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        """Offer one view without waiting; the latest known count (deferred mode)."""
        ...

    async def track_valid_crawler_view(self, content_type: str, content_id: str) -> TrackResult:
        """Count a crawler view apart (never in the view count) and read the count."""
        ...

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """Read counts without counting."""
        ...
