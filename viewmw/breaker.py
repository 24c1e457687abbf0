"""A circuit breaker for the Redis calls on the request path.

Closed: calls go to Redis. After ``failure_threshold`` failures in a row it opens: requests stop
waiting on Redis at all. After ``reset_seconds`` one request is let through as a probe
(half-open); its success closes the breaker, its failure opens it again with a longer back-off.
Each state change is logged once, not per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

logger = logging.getLogger("viewmw")


class BreakerState(StrEnum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Decides whether a call may go to Redis.

    Args:
        failure_threshold: failures in a row that open the breaker.
        reset_seconds: first back-off before a probe; doubled after each failed probe.
        max_reset_seconds: the longest back-off.
        clock: monotonic seconds; inject one in tests.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_seconds: float = 1.0,
        max_reset_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_seconds <= 0 or max_reset_seconds < reset_seconds:
            raise ValueError("failure_threshold >= 1 and 0 < reset_seconds <= max_reset_seconds")
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.max_reset_seconds = max_reset_seconds
        self.clock = clock
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._backoff = reset_seconds
        self._retry_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether this call may go to Redis (``False`` means: use the fallback now)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self._probing or self.clock() < self._retry_at:
            return False
        self._probing = True
        self._set(BreakerState.HALF_OPEN)
        return True

    def success(self) -> None:
        """The call that was allowed succeeded."""
        self._failures = 0
        self._probing = False
        self._backoff = self.reset_seconds
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """The call that was allowed failed or timed out."""
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._backoff = min(self._backoff * 2, self.max_reset_seconds)
        elif self._failures < self.failure_threshold:
            return
        self._probing = False
        self._retry_at = self.clock() + self._backoff
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is BreakerState.OPEN:
            logger.error(
                "Redis is failing: view tracking falls back to the database for %.1fs",
                self._backoff,
            )
        elif state is BreakerState.CLOSED:
            logger.warning("Redis answers again: view tracking is back on Redis")
        else:
            logger.info("probing Redis")
