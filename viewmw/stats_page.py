"""The stats page: a small server-rendered HTML page of what viewmw is doing, to mount in an app.

It shows the outage state (:func:`viewmw.health.check_health` and the circuit breaker), the most
viewed contents of each type for a few periods, blocked views by reason and the last syncs as a
small bar chart. No JavaScript: one GET, one page.

The numbers come from a :class:`StatsSource` (``top`` and ``blocked``, as answered by
``viewmw.analytics.ViewStats``) and from the tracker's Redis and store. Each panel is read on
its own, with its own deadline: one that fails says "unavailable", and the rest of the page is
still served. The page shows operational data and has no access control of its own: mount it
behind the app's authentication (see docs/stats-page.md).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from starlette.types import Receive, Scope, Send

from viewmw.errorlog import ErrorLog
from viewmw.errors import ConfigurationError
from viewmw.health import HealthReport, HealthThresholds, check_health
from viewmw.keys import validate_content_type
from viewmw.outage.breaker import CircuitBreaker
from viewmw.outage.failover import ResilientTracker
from viewmw.stats_render import (
    BreakerView,
    PageData,
    SyncBatch,
    TopCell,
    Unavailable,
    render_page,
    response_headers,
)
from viewmw.store import Store
from viewmw.tracker import ViewTracker

PeriodT = TypeVar("PeriodT", contravariant=True)
P = TypeVar("P")
T = TypeVar("T")


class StatsSource(Protocol[PeriodT]):
    """Where the page's view numbers come from: ``viewmw.analytics.ViewStats`` answers it.

    ``period`` is whatever the source takes (a ``viewmw.analytics.Period``); the page passes
    the values of its ``periods`` through untouched.
    """

    async def top(
        self, content_type: str, period: PeriodT, limit: int = 10
    ) -> list[tuple[str, int]]:
        """``(content id, views)`` of the most viewed contents of a type, most viewed first."""
        ...

    async def blocked(self, period: PeriodT) -> dict[str, int]:
        """Views not counted in the period, by the rule that blocked them."""
        ...


@dataclass(frozen=True, slots=True)
class _Panel:
    """One independent read of the page, named for the log line when it fails."""

    name: str
    read: Callable[[], Awaitable[Any]]


class StatsPage(Generic[P]):
    """An ASGI app serving the stats page at its root (``Mount("/viewmw", app=StatsPage(...))``).

    It uses the tracker's clients and never closes them: they belong to the app. GET and HEAD of
    the mount's root get the page (``Cache-Control: no-store``, a Content-Security-Policy that
    allows no script); other paths get 404, other methods 405.

    Args:
        stats: top contents and blocked views (``ViewStats.from_tracker(tracker)``).
        tracker: the app's tracker: its Redis, store and settings feed the health and sync
            panels. A :class:`~viewmw.outage.failover.ResilientTracker` adds its breaker's state.
        content_types: the types whose top contents are shown; by default every type mapped to
            a table of its own (types counted in the generic table must be named here).
        periods: heading -> period passed to ``stats``, in display order; by default
            ``{"Today": Period.today(), "Last 7 days": Period.last_days(7)}`` of
            ``viewmw.analytics``.
        top_limit: contents per top list.
        sync_history: committed syncs in the chart.
        thresholds: the health check's thresholds (:class:`~viewmw.health.HealthThresholds`).
        panel_timeout: seconds each panel may take before it shows "unavailable" (waiting for
            its turn included, so the page answers within about that long).
        concurrent_reads: panels read at once, across all requests to this page: a page shown
            to several people never takes more of the app's database connections than this.
        title: the page's heading.

    Raises:
        ConfigurationError: a tracker without a store, a bad content type, no periods, or a
            limit below 1.
    """

    def __init__(
        self,
        stats: StatsSource[P],
        tracker: ViewTracker | ResilientTracker,
        *,
        content_types: Sequence[str] | None = None,
        periods: Mapping[str, P] | None = None,
        top_limit: int = 10,
        sync_history: int = 20,
        thresholds: HealthThresholds | None = None,
        panel_timeout: float = 5.0,
        concurrent_reads: int = 4,
        title: str = "viewmw",
    ) -> None:
        self.breaker: CircuitBreaker | None = None
        if isinstance(tracker, ResilientTracker):
            self.breaker = tracker.breaker
            tracker = tracker.tracker
        if tracker.store is None:
            raise ConfigurationError("tracker", "has no store: the page reads the sync ledger")
        limits = (
            ("top_limit", top_limit),
            ("sync_history", sync_history),
            ("concurrent_reads", concurrent_reads),
        )
        for name, value in limits:
            if value < 1:
                raise ConfigurationError(name, f"must be at least 1, got {value!r}")
        if not panel_timeout > 0:
            raise ConfigurationError("panel_timeout", f"must be above 0, got {panel_timeout!r}")
        self.stats = stats
        self.redis = tracker.redis
        self.store: Store = tracker.store
        self.settings = tracker.settings
        self.clock = tracker.clock
        if content_types is None:
            content_types = sorted({*self.settings.content_tables, *self.store.destinations()})
        self.content_types = [validate_content_type(name) for name in content_types]
        self.periods: Mapping[str, P] = dict(periods) if periods is not None else _default_periods()
        if not self.periods:
            raise ConfigurationError("periods", "must name at least one period")
        self.top_limit = top_limit
        self.sync_history = sync_history
        self.thresholds = thresholds or HealthThresholds()
        self.panel_timeout = panel_timeout
        self.title = title
        self._turns = asyncio.Semaphore(concurrent_reads)
        # One log per panel: each is rate-limited on its own, and its lines name it.
        self._errors: dict[str, ErrorLog] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: refused
            await send({"type": "websocket.close", "code": 1000})
            return
        if _route_path(scope) not in ("", "/"):
            await _send(send, scope, 404, b"Not Found", "text/plain; charset=utf-8")
            return
        if scope["method"] not in ("GET", "HEAD"):
            allow = [(b"allow", b"GET, HEAD")]
            await _send(send, scope, 405, b"Method Not Allowed", "text/plain; charset=utf-8", allow)
            return
        page = render_page(await self.read()).encode("utf-8")
        await _send(send, scope, 200, page, "text/html; charset=utf-8", response_headers())

    async def read(self) -> PageData:
        """Everything the page shows, each panel read concurrently within ``panel_timeout``.

        Never raises for a panel that fails: that part is :class:`Unavailable`.
        """
        top_panels = [
            _Panel(f"top {content_type} ({heading})", self._top_reader(content_type, period))
            for content_type in self.content_types
            for heading, period in self.periods.items()
        ]
        blocked_panels = [
            _Panel(f"blocked views ({heading})", self._blocked_reader(period))
            for heading, period in self.periods.items()
        ]
        health, syncs, *rest = await asyncio.gather(
            self._guarded(_Panel("health", self._health)),
            self._guarded(_Panel("sync history", self._syncs)),
            *(self._guarded(panel) for panel in (*top_panels, *blocked_panels)),
        )
        tops, blocked = rest[: len(top_panels)], rest[len(top_panels) :]
        headings = list(self.periods)
        cells = iter(tops)
        return PageData(
            title=self.title,
            generated_at=datetime.fromtimestamp(self.clock(), UTC),
            health=health,
            breaker=self._breaker_view(),
            syncs=syncs,
            periods=headings,
            top=[
                TopCell(content_type, heading, next(cells))
                for content_type in self.content_types
                for heading in headings
            ],
            blocked=dict(zip(headings, blocked, strict=True)),
        )

    async def _guarded(self, panel: _Panel) -> Any:
        try:
            async with asyncio.timeout(self.panel_timeout), self._turns:
                return await panel.read()
        except Exception as exc:  # one panel's failure must not take the page down
            errors = self._errors.get(panel.name)
            if errors is None:
                errors = self._errors[panel.name] = ErrorLog(
                    what=f"reading the stats page's {panel.name}",
                    consequence="that panel shows 'unavailable'",
                )
            errors.report(exc)
            if isinstance(exc, TimeoutError):
                return Unavailable(f"no answer within {self.panel_timeout:g}s")
            return Unavailable(type(exc).__name__)

    async def _health(self) -> HealthReport:
        return await check_health(
            self.redis, self.store, self.settings, self.thresholds, clock=self.clock
        )

    async def _syncs(self) -> list[SyncBatch]:
        rows = await self.store.last_batches(self.sync_history)
        return [SyncBatch.from_row(row) for row in rows]

    def _top_reader(self, content_type: str, period: P) -> Callable[[], Awaitable[Any]]:
        async def read() -> list[tuple[str, int]]:
            # Checked here, so a source's garbage makes this panel unavailable, not the page.
            rows = await self.stats.top(content_type, period, self.top_limit)
            return [(str(content_id), int(views)) for content_id, views in rows]

        return read

    def _blocked_reader(self, period: P) -> Callable[[], Awaitable[Any]]:
        async def read() -> dict[str, int]:
            counts = await self.stats.blocked(period)
            return {str(reason): int(views) for reason, views in counts.items()}

        return read

    def _breaker_view(self) -> BreakerView | None:
        if self.breaker is None:
            return None
        return BreakerView(str(self.breaker.state), self.breaker.opened_count)


def _default_periods() -> dict[str, Any]:
    """Today and the last 7 days, as ``viewmw.analytics`` describes them."""
    try:
        # Looked up when the page is built, not at import: the page imports without it.
        period = importlib.import_module("viewmw.analytics").Period
    except (ImportError, AttributeError):
        raise ConfigurationError(
            "periods", "is required: the default periods need viewmw.analytics.Period"
        ) from None
    return {"Today": period.today(), "Last 7 days": period.last_days(7)}


def _route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette's Mount keeps the full path in ``path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: the clients belong to the app."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send(
    send: Send,
    scope: Scope,
    status: int,
    body: bytes,
    content_type: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("ascii")),
                (b"content-length", str(len(body)).encode("ascii")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
