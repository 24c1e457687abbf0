"""Every viewmw metric: its name, help text and labels, and the recorder that updates them.

Two kinds:

- Events, counted where they happen (:class:`PrometheusRecorder`, in the process's registry):
  views offered, skipped, counted, blocked, queued; the time added to requests; Redis failures and
  late replies; the breakers' state; sync runs, their duration and the views they moved. The
  request path's events (one or two per view) are tallied in plain integers and reach
  prometheus_client in bulk: when the registry is scraped, within :data:`FLUSH_SECONDS`, and at
  exit. A scrape of this process's registry therefore always sees every event so far.
- State that lives in Redis or the database, read when scraped (:func:`scraped_families`, used by
  :class:`~viewmw.metrics.endpoint.MetricsEndpoint`): the pending backlog, the outbox, the last
  committed sync.

In multi-process mode (``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is imported)
events are written to that directory by every process and summed by the one that is scraped.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from viewmw.failures import FailureKind
from viewmw.metrics.recording import (
    PRIMARY_BREAKER,
    SYNC_OUTCOMES,
    SYNC_SUCCESS,
    Recorder,
    recorder,
)
from viewmw.outage.breaker import BreakerState
from viewmw.tracker import _REASONS

SKIP_REASONS = ("bot", "prefetch", "privacy", "invalid_id")
"""Why a matched request was not offered as a view (the debug header's ``reason=``)."""
BREAKERS = ("redis", "database")
BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
"""``viewmw_breaker_state``'s values."""
# Seconds viewmw adds to a request: a Redis round trip, sometimes a database read.
REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FLUSH_SECONDS = 1.0
"""Longest the request path's tallies wait before they reach prometheus_client (in multi-process
mode, before other processes' scrapes see them; this process's own scrapes see them at once)."""
SYNC_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)


class PrometheusRecorder(Recorder):
    """Records viewmw's events in prometheus_client metrics, registered in ``registry``.

    Labelled children are bound once here. The request path's events are tallied in plain
    integers (a dictionary lookup and an addition per view, no lock) by the event loop's thread,
    and added to the metrics in bulk by :meth:`flush`.
    """

    enabled = True

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        # Registered before the metrics, so a scrape flushes the tallies before reading them.
        registry.register(_Flusher(self))
        offered = Counter(
            "viewmw_views_offered",
            "Requests of tracked routes offered to the abuse rules as a view.",
            registry=registry,
        )
        skipped = Counter(
            "viewmw_views_skipped",
            "Requests of tracked routes not offered as a view, by reason.",
            ["reason"],
            registry=registry,
        )
        counted = Counter(
            "viewmw_views_counted",
            "Views the abuse rules counted (replayed outage views included).",
            registry=registry,
        )
        blocked = Counter(
            "viewmw_views_blocked",
            "Views the abuse rules refused, by the first rule that blocked them.",
            ["reason"],
            registry=registry,
        )
        self._queued = Counter(
            "viewmw_views_queued",
            "Views kept in the database outbox while Redis was unreachable.",
            registry=registry,
        )
        self._added = Histogram(
            "viewmw_request_added_seconds",
            "Time viewmw added to a tracked request (offering the view, reading the count).",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._redis_errors = Counter(
            "viewmw_redis_errors",
            "Request-path Redis calls that failed (refused, reset, unparsable reply).",
            registry=registry,
        )
        self._late_replies = Counter(
            "viewmw_redis_late_replies",
            "Request-path Redis replies that came after the deadline (an unknown outcome, "
            "decided by Redis; not a failure).",
            registry=registry,
        )
        breaker_state = Gauge(
            "viewmw_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open (worst live process).",
            ["breaker"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        breaker_opened = Counter(
            "viewmw_breaker_opened",
            "Times a circuit breaker opened.",
            ["breaker"],
            registry=registry,
        )
        self._primary_state = Gauge(
            "viewmw_redis_primary_breaker_state",
            "A Redis Cluster primary's own breaker: 0 closed, 1 half-open, 2 open (worst live "
            "process).",
            ["primary"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self._primary_opened = Counter(
            "viewmw_redis_primary_breaker_opened",
            "Times a Redis Cluster primary's own breaker opened.",
            ["primary"],
            registry=registry,
        )
        sync_runs = Counter(
            "viewmw_sync_runs",
            "Sync runs, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._sync_duration = Histogram(
            "viewmw_sync_duration_seconds",
            "Duration of sync runs (every outcome).",
            buckets=SYNC_BUCKETS,
            registry=registry,
        )
        self._views_moved = Counter(
            "viewmw_sync_views_moved",
            "Views the sync moved into the database.",
            registry=registry,
        )
        self._last_success = Gauge(
            "viewmw_sync_last_success_timestamp_seconds",
            "When a sync run of this process (or of any process, in multi-process mode) last "
            "ran to its end.",
            multiprocess_mode="max",
            registry=registry,
        )
        self._offered = offered
        self._counted = counted
        # The debug header's value of a skipped request -> its counter; anything else was offered.
        self._skipped = {
            b"0; reason=" + reason.encode(): skipped.labels(reason) for reason in SKIP_REASONS
        }
        self._blocked = {code: blocked.labels(reason) for code, reason in _REASONS.items()}
        self._breaker_state = {name: breaker_state.labels(name) for name in BREAKERS}
        self._breaker_opened = {name: breaker_opened.labels(name) for name in BREAKERS}
        self._sync_runs = {outcome: sync_runs.labels(outcome) for outcome in SYNC_OUTCOMES}
        for state in self._breaker_state.values():
            state.set(0)  # exported as closed before the first change
        # Tallies since the last flush: requests per debug value, Histogram buckets (by index,
        # the last one +Inf) and sum of the time added, views counted, blocked per rule code.
        self._requests: dict[bytes, int] = {}
        self._added_buckets = [0] * (len(REQUEST_BUCKETS) + 1)
        self._added_sum = 0.0
        self._counted_views = 0
        self._blocked_views: dict[int, int] = {}
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is set to run
        self._flush_lock = threading.Lock()
        atexit.register(self.flush)  # multi-process mode: the files outlive the process

    def request_handled(self, debug: bytes, seconds: float) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.request_handled`."""
        requests = self._requests
        requests[debug] = requests.get(debug, 0) + 1
        # The bucket observe() would pick: the first bound at or above the value.
        self._added_buckets[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self._added_sum += seconds
        if not self._flush_due():
            self._flush_soon()

    def views_decided(self, replies: Sequence[Sequence[Any]]) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.views_decided`."""
        counted = 0
        blocked = self._blocked_views
        for reply in replies:
            if reply[0] == 1:
                counted += 1
            # Not counted without a rule's code: a crawler view, counted apart (never blocked).
            elif reply[0] == 0 and reply[1] in self._blocked:
                blocked[reply[1]] = blocked.get(reply[1], 0) + 1
        self._counted_views += counted
        if not self._flush_due():
            self._flush_soon()

    def _flush_due(self) -> bool:
        """Whether a flush is set to run: a loop closed before its timer fired runs none."""
        loop = self._flush_loop
        return loop is not None and not loop.is_closed()

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to wait on
            self.flush()
            return
        self._flush_loop = loop
        loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Add the tallies to the metrics (a scrape of the registry calls this first)."""
        with self._flush_lock:
            self._flush_loop = None
            requests, self._requests = self._requests, {}
            buckets, self._added_buckets = self._added_buckets, [0] * len(self._added_buckets)
            added, self._added_sum = self._added_sum, 0.0
            counted, self._counted_views = self._counted_views, 0
            blocked, self._blocked_views = self._blocked_views, {}
            for debug, n in requests.items():
                self._skipped.get(debug, self._offered).inc(n)
            # Histogram has no bulk observe: its buckets and sum take the amounts observe()
            # would have added one by one.
            for index, n in enumerate(buckets):
                if n:
                    self._added._buckets[index].inc(n)
            if added:
                self._added._sum.inc(added)
            if counted:
                self._counted.inc(counted)
            for code, n in blocked.items():
                self._blocked[code].inc(n)

    def view_queued(self) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.view_queued`."""
        self._queued.inc()

    def redis_failed(self, kind: FailureKind) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.redis_failed`."""
        if kind is FailureKind.LATE:
            self._late_replies.inc()
        elif kind is FailureKind.REDIS:
            self._redis_errors.inc()

    def breaker_changed(self, breaker: str, state: str) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.breaker_changed`."""
        if breaker.startswith(PRIMARY_BREAKER):
            primary = breaker.removeprefix(PRIMARY_BREAKER)
            self._primary_state.labels(primary).set(BREAKER_STATE_VALUES[BreakerState(state)])
            if state == BreakerState.OPEN:
                self._primary_opened.labels(primary).inc()
            return
        gauge = self._breaker_state.get(breaker)
        if gauge is None:  # a breaker built by hand under another name: not exported
            return
        gauge.set(BREAKER_STATE_VALUES[BreakerState(state)])
        if state == BreakerState.OPEN:
            self._breaker_opened[breaker].inc()

    def sync_finished(self, outcome: str, seconds: float, views: int) -> None:
        """See :meth:`viewmw.metrics.recording.Recorder.sync_finished`."""
        self._sync_runs[outcome].inc()
        self._sync_duration.observe(seconds)
        if views:
            self._views_moved.inc(views)
        if outcome == SYNC_SUCCESS:
            self._last_success.set_to_current_time()


def scraped_families(
    *,
    redis_up: bool,
    database_up: bool,
    pending_contents: int | None,
    outbox_views: int | None,
    outbox_oldest_age: float | None,
    last_sync_timestamp: float | None,
) -> Iterable[Metric]:
    """The metrics read from Redis and the database at scrape time; a value that could not be
    read (its server is down) is left out rather than reported as 0."""

    def gauge(name: str, documentation: str, value: float | None) -> Iterable[Metric]:
        if value is not None:
            yield GaugeMetricFamily(name, documentation, value=value)

    yield from gauge("viewmw_redis_up", "Whether Redis answered PING (1) or not (0).", redis_up)
    yield from gauge(
        "viewmw_database_up", "Whether the database answered SELECT 1 (1) or not (0).", database_up
    )
    yield from gauge(
        "viewmw_pending_contents",
        "Contents with views in Redis waiting for the sync (the dirty set).",
        pending_contents,
    )
    yield from gauge(
        "viewmw_outbox_views",
        "Views kept in the database outbox during a Redis outage, not replayed yet.",
        outbox_views,
    )
    yield from gauge(
        "viewmw_outbox_oldest_view_age_seconds",
        "Age of the oldest view waiting in the outbox (0 when it is empty).",
        outbox_oldest_age,
    )
    yield from gauge(
        "viewmw_last_sync_timestamp_seconds",
        "When the newest sync batch was committed to the database (the ledger).",
        last_sync_timestamp,
    )


def exposition(scraped: Sequence[Metric]) -> bytes:
    """The text Prometheus scrapes: the event metrics, then ``scraped``."""
    return generate_latest(events_registry()) + generate_latest(_Fixed(scraped))


def events_registry() -> CollectorRegistry:
    """Where the event metrics are exported from: the process's registry, or in multi-process
    mode a fresh registry per scrape that sums every process's files (as prometheus_client
    documents)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY  # its collection flushes this process's tallies
    # The files are read, not REGISTRY: this process's tallies go to its files first.
    current = recorder()
    if isinstance(current, PrometheusRecorder):
        current.flush()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class _Flusher(Collector):
    """Flushes a recorder's tallies when its registry is collected; exports nothing."""

    def __init__(self, recorder: PrometheusRecorder) -> None:
        self.recorder = recorder

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        self.recorder.flush()
        return ()


class _Fixed(Collector):
    """A collector of metric families read already."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families
