"""The exceptions viewmw raises on purpose, as one tree ordered by who failed."""

from __future__ import annotations


class ViewmwError(Exception):
    """Base class of every error viewmw raises on purpose."""


class ConfigurationError(ViewmwError, ValueError):
    """A setting (or the ``VIEWMW_*`` variable it came from) has an invalid value."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting} {reason}")


class InvalidKeyError(ViewmwError, ValueError):
    """A content type, content id or viewer is not allowed in a Redis key (or in its table)."""


class ServiceUnavailableError(ViewmwError):
    """Redis or the database cannot be reached; the message says how to start it."""


class MalformedReplyError(ViewmwError):
    """Redis answered something a viewmw script never returns (a confused or foreign server)."""


class SyncError(ViewmwError):
    """A sync could not finish; what it moved is safe and the next sync completes it."""


class LockLostError(SyncError):
    """The sync lock expired and another sync took over; this one stopped without committing."""


class StaleFenceError(LockLostError):
    """The database refused a commit: a sync holding a newer lock has committed since."""


class MiddlewareMissingError(ViewmwError, RuntimeError):
    """A request-facing helper (``track(request)``…) got a request no ViewTrackingMiddleware
    handled."""
