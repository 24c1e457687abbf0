"""The worker's metrics: a multi-process directory shared by its processes, and the small HTTP
server that exports it (run by Dramatiq as a fork of its main process, see
:mod:`viewmw.jobs.metrics`).

``dramatiq`` runs several worker processes; each writes its metrics to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multi-process mode), and one server sums them.
Without that variable the directory is ``<temp dir>/viewmw-metrics-<port>``, the same for every
process of one worker because it depends only on ``VIEWMW_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from viewmw.errors import ConfigurationError
from viewmw.settings import read_environment

logger = logging.getLogger("viewmw.jobs")

PORT_VARIABLE = "VIEWMW_METRICS_PORT"
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(port: int) -> Path:
    """Make sure this process records its metrics in the worker's shared directory, and return it.

    Must run before prometheus_client is imported (it reads the variable once, on import).
    """
    directory = Path(os.environ.get(MULTIPROC_VARIABLE) or _default_dir(port))
    os.environ[MULTIPROC_VARIABLE] = str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = sys.modules.get("prometheus_client.values")
    if values is not None and values.ValueClass is values.MutexValue:
        logger.warning(
            "prometheus_client was imported before %s was set: this process's viewmw metrics "
            "stay in this process and are not exported by the worker's metrics server",
            MULTIPROC_VARIABLE,
        )
    return directory


def _default_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"viewmw-metrics-{port}"


def serve_worker_metrics() -> None:
    """Serve the worker's metrics on ``VIEWMW_METRICS_PORT`` until the process is stopped.

    Dramatiq's main process runs it in a process of its own (a "fork"); each scrape sums the
    files of every worker process.
    """
    port = read_environment("worker").get("metrics_port")
    if port is None:
        raise ConfigurationError(PORT_VARIABLE, "is not set: the worker's metrics server needs it")
    directory = use_multiprocess_dir(port)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    _, thread = start_http_server(port, registry=registry)
    logger.info("viewmw: worker metrics on port %d (from %s)", port, directory)
    thread.join()
