"""viewmw's background jobs: ``dramatiq jobs`` runs the worker, ``periodiq jobs`` the scheduler.

Importing this package configures the broker (from ``VIEWMW_BROKER_URL``, else
``VIEWMW_REDIS_URL``) and declares the actors; the schedule's cron is read in
``VIEWMW_TIMEZONE``.
"""

from jobs.actors import cleanup_view_tracking, notify_sync_failure, sync_view_counts
from jobs.broker import broker

__all__ = ["broker", "cleanup_view_tracking", "notify_sync_failure", "sync_view_counts"]
