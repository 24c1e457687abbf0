"""The recording interface: one call per event, and a recorder that does nothing.

The request path, the tracker, the outage failover, the breaker and the sync each hold the
process's recorder (:func:`recorder`) and call it once per event, never asking whether metrics are
on. Without prometheus_client installed that recorder is the base :class:`Recorder`, whose calls
do nothing; with it, :class:`~viewmw.metrics.prometheus.PrometheusRecorder`.

prometheus_client is imported at the first :func:`recorder` call, not when viewmw is imported: it
picks its single- or multi-process mode from ``PROMETHEUS_MULTIPROC_DIR`` when it is imported, and
the worker sets that variable after importing viewmw (see :mod:`viewmw.jobs.metrics`).
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from viewmw.errors import LockLostError
from viewmw.failures import FailureKind

P = ParamSpec("P")


class _SyncResult(Protocol):
    already_running: bool
    views: int


R = TypeVar("R", bound=_SyncResult)

SYNC_SUCCESS, SYNC_ALREADY_RUNNING, SYNC_LOCK_LOST, SYNC_FAILED = (
    "success",
    "already_running",
    "lock_lost",
    "failed",
)
SYNC_OUTCOMES = (SYNC_SUCCESS, SYNC_ALREADY_RUNNING, SYNC_LOCK_LOST, SYNC_FAILED)
"""How a sync run ended: it ran to its end (moving views or not), another sync held the lock, its
lock expired under it, or it raised."""


class Recorder:
    """What viewmw reports about its work. This base class records nothing (metrics off)."""

    enabled = False

    def request_handled(self, debug: bytes, seconds: float) -> None:
        """The middleware answered a matched request with a counting status: ``debug`` is the
        debug header's value (it says whether the view was offered or skipped, and why), and
        ``seconds`` the time viewmw added to the request."""

    def views_decided(self, replies: Sequence[Sequence[Any]]) -> None:
        """The recording script decided a batch of views: per view, ``counted`` (1, 0, or -1 for
        a replayed view decided before) and the blocking rule's code, its first two items."""

    def view_queued(self) -> None:
        """A view went to the outage outbox (Redis unreachable)."""

    def redis_failed(self, kind: FailureKind) -> None:
        """A request-path Redis call failed (``REDIS``) or its reply was late (``LATE``)."""

    def breaker_changed(self, breaker: str, state: str) -> None:
        """The breaker named ``breaker`` (``redis``, ``database``, or a Redis Cluster primary's:
        :data:`PRIMARY_BREAKER` and its ``host:port``) moved to ``state``."""

    def sync_finished(self, outcome: str, seconds: float, views: int) -> None:
        """A sync run ended with ``outcome`` (one of :data:`SYNC_OUTCOMES`) after ``seconds``,
        having moved ``views`` views into the database."""


PRIMARY_BREAKER = "redis_primary:"
"""The start of a Redis Cluster primary's breaker's name; its ``host:port`` follows."""

_recorder: Recorder | None = None


def recorder() -> Recorder:
    """The process's recorder: Prometheus when prometheus_client is installed, else a no-op."""
    global _recorder
    if _recorder is None:
        _recorder = _new_recorder()
    return _recorder


def prometheus_installed() -> bool:
    """Whether prometheus_client can be imported (the ``metrics`` extra)."""
    return importlib.util.find_spec("prometheus_client") is not None


def _new_recorder() -> Recorder:
    if not prometheus_installed():
        return Recorder()
    from viewmw.metrics.prometheus import PrometheusRecorder

    return PrometheusRecorder()


def record_sync(run: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorates a sync's ``run``: its outcome, duration and the views it moved are recorded."""

    @functools.wraps(run)
    async def recorded(*args: P.args, **kwargs: P.kwargs) -> R:
        metrics = recorder()
        started = time.monotonic()
        try:
            report = await run(*args, **kwargs)
        except LockLostError:
            metrics.sync_finished(SYNC_LOCK_LOST, time.monotonic() - started, 0)
            raise
        except BaseException:  # cancelled (the worker's time limit) included
            metrics.sync_finished(SYNC_FAILED, time.monotonic() - started, 0)
            raise
        outcome = SYNC_ALREADY_RUNNING if report.already_running else SYNC_SUCCESS
        metrics.sync_finished(outcome, time.monotonic() - started, report.views)
        return report

    return recorded
