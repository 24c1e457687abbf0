"""Rate-limited failure logging: an outage must not flood the logs with one line per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from viewmw.failures import classify

logger = logging.getLogger("viewmw")

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines about the same kind of failure."""


class ErrorLog:
    """Logs failures on the ``viewmw`` logger at ERROR, at most once per ``interval`` per kind.

    Kinds: ``timeout``, ``redis``, ``database``, ``invalid_key`` and ``unexpected`` (logged with
    its traceback). Each line says how many failures of its kind were left out since the last.
    Records carry the kind as ``record.viewmw_error``.
    """

    def __init__(
        self,
        interval: float = ERROR_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        *,
        what: str = "view tracking",
        consequence: str = "the response went out without a count",
    ) -> None:
        self.interval = interval
        self.what = what
        self.consequence = consequence
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, exc: BaseException) -> None:
        """Count a failure, and log it unless one of its kind was logged recently."""
        kind = error_kind(exc)
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        logger.error(
            "viewmw: %s failed (%s: %s: %s); %s%s",
            self.what,
            kind,
            type(exc).__name__,
            exc,
            self.consequence,
            f"; {suppressed} more {kind} failures since the last report" if suppressed else "",
            exc_info=exc if kind == "unexpected" else None,
            extra={"viewmw_error": kind},
        )


def error_kind(exc: BaseException) -> str:
    """A short name for the kind of failure ``exc`` is (see :func:`viewmw.failures.classify`)."""
    return str(classify(exc))
