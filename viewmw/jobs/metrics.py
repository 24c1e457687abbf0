"""The worker's metrics server, as a Dramatiq middleware (on when ``VIEWMW_METRICS_PORT`` is set).

Every worker process records viewmw's metrics (sync runs, their duration, the views moved, replayed
outage views) into the shared multi-process directory; Dramatiq's main process runs one extra
process, :func:`~viewmw.metrics.worker.serve_worker_metrics`, that exports their sum. Dramatiq's
own Prometheus middleware is separate and stays off unless you add it.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq

from viewmw.metrics.recording import recorder
from viewmw.metrics.worker import serve_worker_metrics, use_multiprocess_dir


class WorkerMetrics(dramatiq.Middleware):
    """Exports viewmw's metrics of every worker process on ``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Before anything imports prometheus_client in this process.
        self.directory = use_multiprocess_dir(port)

    @property
    def forks(self) -> list[Any]:
        """The exposition server, started once by Dramatiq's main process."""
        return [serve_worker_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Create this process's metrics now: exported at 0 until its first sync."""
        recorder()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Drop this process's live gauges (the breaker state) from the sum."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]
