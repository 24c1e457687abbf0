"""The exceptions viewmw raises on purpose."""

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
    """A content type, content id or viewer is not allowed in a Redis key."""


class ServiceUnavailableError(ViewmwError):
    """Redis or the database cannot be reached; the message says how to start it."""
