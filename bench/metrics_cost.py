"""CPU the metrics add to a counted view: the recorder's calls alone, Prometheus against no-op.

``python -m bench.metrics_cost``: the middleware's call (a counter and the added-time histogram)
and the tracker's call for a batch of one counted view, timed with ``time.process_time`` (best
of five runs), so a busy machine inflates the figures less than wall time would.
"""

from __future__ import annotations

import time
import timeit

from prometheus_client import CollectorRegistry

from viewmw.metrics.prometheus import PrometheusRecorder
from viewmw.metrics.recording import Recorder

CALLS = 200_000
# One reply of a counted view, as the tracker passes it on.
REPLIES = [(1, 0, 1, 0, 5, 0, "")]


def per_view(recorder: Recorder) -> float:
    """Microseconds of CPU per counted view."""

    def view() -> None:
        recorder.request_handled(b"1", 0.0012)
        recorder.views_decided(REPLIES)

    best = min(timeit.repeat(view, number=CALLS, repeat=5, timer=time.process_time))
    return best / CALLS * 1e6


def main() -> None:
    prometheus = per_view(PrometheusRecorder(CollectorRegistry()))
    off = per_view(Recorder())
    print(f"metrics on (prometheus_client): {prometheus:.2f} µs of CPU per counted view")
    print(f"metrics off (no-op recorder):   {off:.2f} µs of CPU per counted view")


if __name__ == "__main__":
    main()
