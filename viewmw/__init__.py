"""viewmw: abuse-resistant view counting for any ASGI app.

Wrap an app in :class:`ViewTrackingMiddleware`; record and read views directly with
:class:`ViewTracker`; move pending views into the database with :class:`ViewSync`.
"""

from viewmw.breaker import CircuitBreaker
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
from viewmw.fallback import DatabaseFallback
from viewmw.keys import KeySchema
from viewmw.middleware import ViewTrackingMiddleware
from viewmw.resilient import ResilientTracker
from viewmw.routes import RouteTable
from viewmw.settings import Limits, Settings
from viewmw.store import Store, content_table, metadata
from viewmw.sync import SyncReport, ViewSync
from viewmw.tracker import BlockReason, TrackResult, ViewCount, ViewTracker

__all__ = [
    "BlockReason",
    "CircuitBreaker",
    "ConfigurationError",
    "DatabaseFallback",
    "InvalidKeyError",
    "KeySchema",
    "Limits",
    "LockLostError",
    "MalformedReplyError",
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
    "ViewSync",
    "ViewTracker",
    "ViewTrackingMiddleware",
    "ViewmwError",
    "content_table",
    "metadata",
]
