"""viewmw's background jobs: ``dramatiq viewmw.jobs`` runs the worker, ``periodiq viewmw.jobs``
the scheduler.

Importing this package configures the broker (from ``VIEWMW_BROKER_URL``, else
``VIEWMW_REDIS_URL``) and declares the actors; the schedule's cron is read in
``VIEWMW_TIMEZONE``. A bad ``VIEWMW_*`` value stops the import with one line naming the variable.
Dramatiq and periodiq are the optional ``worker`` extra: ``import viewmw`` never needs them.
"""

try:  # before anything below imports them, so the message says what to install
    import dramatiq  # noqa: F401
    import periodiq  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        f"viewmw.jobs needs the worker extra ({exc.name} is not installed): "
        "pip install 'viewmw[worker]'",
        name=exc.name,
    ) from None

from viewmw.jobs.actors import cleanup_view_tracking, notify_sync_failure, sync_view_counts
from viewmw.jobs.broker import broker

__all__ = ["broker", "cleanup_view_tracking", "notify_sync_failure", "sync_view_counts"]
