"""viewmw: abuse-resistant view counting for any ASGI app.

Public API::

    from viewmw import ViewTracker, Settings, Limits, Store
"""

from viewmw.errors import ConfigurationError, InvalidKeyError, ServiceUnavailableError, ViewmwError
from viewmw.keys import KeySchema
from viewmw.settings import Limits, Settings
from viewmw.store import Store, content_table, metadata
from viewmw.tracker import BlockReason, TrackResult, ViewCount, ViewTracker

__all__ = [
    "BlockReason",
    "ConfigurationError",
    "InvalidKeyError",
    "KeySchema",
    "Limits",
    "ServiceUnavailableError",
    "Settings",
    "Store",
    "TrackResult",
    "ViewCount",
    "ViewTracker",
    "ViewmwError",
    "content_table",
    "metadata",
]
