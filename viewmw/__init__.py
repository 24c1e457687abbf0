"""viewmw: abuse-resistant view counting for any ASGI app.

Wrap an app in :class:`ViewTrackingMiddleware`; record and read views directly with
:class:`ViewTracker`; move pending views into the database with :class:`ViewSync`.
"""

from importlib.metadata import PackageNotFoundError, version

from viewmw.analytics import DayCount, Period, PeriodCount, ViewStats
from viewmw.errors import (
    ConfigurationError,
    InvalidKeyError,
    LockLostError,
    MalformedReplyError,
    ServiceUnavailableError,
    StaleFenceError,
    SyncError,
    ViewmwError,
)
from viewmw.keys import KeySchema
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.outage.breaker import CircuitBreaker
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox, OutboxEvent
from viewmw.outage.probe import RedisProbe
from viewmw.outage.replayer import Replayer, ReplayReport
from viewmw.routes import RouteTable
from viewmw.settings import Limits, Settings
from viewmw.store import DayDelta, Store, content_table, daily_views, metadata
from viewmw.sync import SyncReport, ViewSync
from viewmw.tracker import BlockReason, TrackResult, ViewCount, ViewTracker

try:
    __version__ = version("viewmw")
except PackageNotFoundError:  # pragma: no cover - a checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "BlockReason",
    "CircuitBreaker",
    "ConfigurationError",
    "DayCount",
    "DayDelta",
    "InvalidKeyError",
    "KeySchema",
    "Limits",
    "LockLostError",
    "MalformedReplyError",
    "Outbox",
    "OutboxEvent",
    "Period",
    "PeriodCount",
    "RedisProbe",
    "ReplayReport",
    "Replayer",
    "ResilientTracker",
    "RouteTable",
    "ServiceUnavailableError",
    "Settings",
    "StaleFenceError",
    "Store",
    "SyncError",
    "SyncReport",
    "TrackResult",
    "ViewCount",
    "ViewStats",
    "ViewSync",
    "ViewTracker",
    "ViewTrackingMiddleware",
    "ViewmwError",
    "__version__",
    "content_table",
    "daily_views",
    "metadata",
]
