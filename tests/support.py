"""Helpers shared by the tests: an injectable clock and service URLs."""

from __future__ import annotations

import os
from dataclasses import dataclass

REDIS_URL = os.environ.get("VIEWMW_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
DATABASE_URL = os.environ.get(
    "VIEWMW_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)

HOW_TO_START_REDIS = (
    "Redis is not reachable at {url} ({error}). Start one with\n"
    "    redis-server --port 6379 --save '' --appendonly no --daemonize yes\n"
    "or point VIEWMW_TEST_REDIS_URL at a Redis the tests may use (its database is flushed)."
)
HOW_TO_START_POSTGRES = (
    "PostgreSQL is not reachable at {url} ({error}). Start one (e.g. "
    "`pg_ctlcluster 15 main start`, or your distribution's service) with a database the tests may "
    "use, or point VIEWMW_TEST_DATABASE_URL at one (postgresql+asyncpg://user@host:port/db)."
)

# 2025-11-24 12:00:00 UTC: a Monday noon, far from midnight in most zones.
NOON_UTC = 1764000000.0 - 1764000000.0 % 86400 + 12 * 3600


@dataclass
class FakeClock:
    """A clock the tests move by hand: ``clock()`` returns seconds since the epoch."""

    now: float = NOON_UTC

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
