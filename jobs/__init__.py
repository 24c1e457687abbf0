"""This repository's deployable worker entry: ``dramatiq jobs`` and ``periodiq jobs``.

The wiring ships in the library as :mod:`viewmw.jobs` (``dramatiq viewmw.jobs`` is the same
worker); importing it configures the broker and declares the actors.
"""

from viewmw.jobs import broker, cleanup_view_tracking, notify_sync_failure, sync_view_counts

__all__ = ["broker", "cleanup_view_tracking", "notify_sync_failure", "sync_view_counts"]
