"""Prometheus metrics for the web process and the worker (the optional ``metrics`` extra).

- :mod:`~viewmw.metrics.recording`: the recording interface the middleware, the tracker, the
  outage failover, the breaker and the sync call, one call per event; a no-op without
  prometheus_client.
- :mod:`~viewmw.metrics.prometheus`: every metric's name, help text and labels.
- :mod:`~viewmw.metrics.endpoint`: :class:`MetricsEndpoint`, the ASGI app Prometheus scrapes.
- :mod:`viewmw.jobs.metrics`: the worker's exposition server (``VIEWMW_METRICS_PORT``).

viewmw imports and runs without prometheus_client: metrics are then off, and only asking for the
endpoint raises :class:`~viewmw.errors.ConfigurationError`.
"""

from viewmw.metrics.endpoint import MetricsEndpoint
from viewmw.metrics.recording import Recorder, recorder

__all__ = ["MetricsEndpoint", "Recorder", "recorder"]
