"""viewmw: abuse-resistant view counting for any ASGI app.

Wrap an app in :class:`ViewTrackingMiddleware`; record and read views directly with
:class:`ViewTracker`; move pending views into the database with :class:`ViewSync`. Inside a
handler, :func:`track` decides the request's view before the page renders and :func:`view_counts`
reads the counts of a list page.
"""

from importlib.metadata import PackageNotFoundError, version

from viewmw.analytics import ViewStats
from viewmw.assembly import BuiltTracker, build_tracker
from viewmw.contract import BlockReason, RequestTracker, TrackResult, ViewCount
from viewmw.errors import (
    ConfigurationError,
    InvalidKeyError,
    LockLostError,
    MalformedReplyError,
    MiddlewareMissingError,
    ServiceUnavailableError,
    StaleFenceError,
    SyncError,
    ViewmwError,
)
from viewmw.handlers import RequestView, ViewCounter, track, view_counter, view_counts
from viewmw.keys import KeySchema
from viewmw.metrics import MetricsEndpoint
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.migration import KeyMigration, MigrationReport
from viewmw.node_connections import NodeConnections
from viewmw.outage.breaker import CircuitBreaker
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox, OutboxEvent
from viewmw.outage.probe import RedisProbe
from viewmw.outage.replayer import Replayer, ReplayReport
from viewmw.periods import DayCount, Period, PeriodCount
from viewmw.routes import RouteTable
from viewmw.script_connection import ScriptConnection
from viewmw.settings import Limits, Settings
from viewmw.stats_page import StatsPage, StatsSource
from viewmw.store import DayDelta, Store, content_table, daily_views, metadata
from viewmw.sync import SyncReport, ViewSync
from viewmw.tracker import ViewTracker

try:
    __version__ = version("viewmw")
except PackageNotFoundError:  # pragma: no cover - a checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "BlockReason",
    "BuiltTracker",
    "CircuitBreaker",
    "ConfigurationError",
    "DayCount",
    "DayDelta",
    "InvalidKeyError",
    "KeyMigration",
    "KeySchema",
    "Limits",
    "LockLostError",
    "MalformedReplyError",
    "MetricsEndpoint",
    "MiddlewareMissingError",
    "MigrationReport",
    "NodeConnections",
    "Outbox",
    "OutboxEvent",
    "Period",
    "PeriodCount",
    "RedisProbe",
    "ReplayReport",
    "Replayer",
    "RequestTracker",
    "RequestView",
    "ResilientTracker",
    "RouteTable",
    "ScriptConnection",
    "ServiceUnavailableError",
    "Settings",
    "StaleFenceError",
    "StatsPage",
    "StatsSource",
    "Store",
    "SyncError",
    "SyncReport",
    "TrackResult",
    "ViewCount",
    "ViewCounter",
    "ViewStats",
    "ViewSync",
    "ViewTracker",
    "ViewTrackingMiddleware",
    "ViewmwError",
    "__version__",
    "build_tracker",
    "content_table",
    "daily_views",
    "metadata",
    "track",
    "view_counter",
    "view_counts",
]
