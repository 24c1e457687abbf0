"""A circuit breaker for the calls a request makes to Redis (or to the database).

Closed: calls go through. After ``failure_threshold`` failures in a row it opens: requests stop
waiting on that server at all. After ``reset_seconds`` one call is let through as a probe
(half-open); its success closes the breaker, its failure opens it again with a longer back-off.
Each state change is logged once, not per request.

What counts as a failure is the caller's decision (see :mod:`viewmw.failures`): for Redis, what
the server says, never the app's own event-loop lag.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

from viewmw.metrics.recording import recorder

logger = logging.getLogger("viewmw")


class BreakerState(StrEnum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Decides whether a call may go to a server.

    Args:
        failure_threshold: failures in a row that open the breaker.
        reset_seconds: first back-off before a probe; doubled after each failed probe.
        max_reset_seconds: the longest back-off.
        clock: monotonic seconds; inject one in tests.
        subject: the server's name in log lines ("Redis", "the database").
        fallback: what happens while the breaker is open, for log lines.
        name: the breaker's label in metrics (``redis``, ``database``).
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_seconds: float = 1.0,
        max_reset_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        subject: str = "Redis",
        fallback: str = "views offered meanwhile go to the database outbox",
        name: str = "redis",
    ) -> None:
        if failure_threshold < 1 or reset_seconds <= 0 or max_reset_seconds < reset_seconds:
            raise ValueError("failure_threshold >= 1 and 0 < reset_seconds <= max_reset_seconds")
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.max_reset_seconds = max_reset_seconds
        self.clock = clock
        self.subject = subject
        self.fallback = fallback
        self.name = name
        self.metrics = recorder()
        self.state = BreakerState.CLOSED
        self.opened_count = 0
        self._failures = 0
        self._backoff = reset_seconds
        self._retry_at = 0.0
        self._probing = False
        self.metrics.breaker_changed(name, self.state)  # the breaker in use now starts closed

    def allow(self) -> bool:
        """Whether this call may go to the server (``False``: skip it now)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self._probing or self.clock() < self._retry_at:
            return False
        self._probing = True
        self._set(BreakerState.HALF_OPEN)
        return True

    @property
    def is_closed(self) -> bool:
        """Whether calls go through without restriction."""
        return self.state is BreakerState.CLOSED

    def success(self) -> None:
        """The call that was allowed succeeded."""
        self._failures = 0
        self._probing = False
        self._backoff = self.reset_seconds
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """The call that was allowed failed."""
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._backoff = min(self._backoff * 2, self.max_reset_seconds)
        elif self._failures < self.failure_threshold:
            return
        self._open()

    def inconclusive(self) -> None:
        """The call that was allowed ended without an answer either way (the caller's own
        deadline passed): it neither opens nor closes the breaker; a probe may be tried again."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False

    def trip(self) -> None:
        """Open now: a check outside the request path found the server failing."""
        if self.state is BreakerState.HALF_OPEN:
            self._backoff = min(self._backoff * 2, self.max_reset_seconds)
        self._failures = max(self._failures, self.failure_threshold)
        self._open()

    def _open(self) -> None:
        self._probing = False
        self._retry_at = self.clock() + self._backoff
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is self.state:
            return
        self.state = state
        self.metrics.breaker_changed(self.name, state)
        if state is BreakerState.OPEN:
            self.opened_count += 1
            logger.error(
                "%s is failing: %s; next try in %.1fs", self.subject, self.fallback, self._backoff
            )
        elif state is BreakerState.CLOSED:
            logger.warning("%s answers again", self.subject)
        else:
            logger.info("probing %s", self.subject)
