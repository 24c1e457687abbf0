"""CPU the metrics add to a counted view, measured side by side in one run.

``python -m bench.metrics_cost``:

- the recorder's calls alone (the middleware's counter and added-time histogram, the tracker's
  counter for a batch of one counted view), Prometheus against the no-op recorder;
- tracked requests through the middleware on a private Redis-compatible server (as
  ``bench.profile_request tracked``, every request a new viewer, so every view counts), in blocks
  with the recorder on and off, interleaved in one process so that a busy machine weighs on both,
  and the same with the recorder off on both sides as a control for the machine's noise.

CPU is this process's (``time.process_time``): Redis' own work is left out.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import timeit
from typing import Any

from prometheus_client import CollectorRegistry

from bench.profile_request import CONCURRENCY, _drive, _plain_app
from bench.redis_server import bench_redis_server
from viewmw import ResilientTracker, Settings, ViewTracker, ViewTrackingMiddleware
from viewmw.assembly import connect_redis
from viewmw.metrics.prometheus import PrometheusRecorder
from viewmw.metrics.recording import Recorder

CALLS = 200_000
# One reply of a counted view, as the tracker passes it on.
REPLIES = [(1, 0, 1, 0, 5, 0, "")]
BLOCK = 4000
ROUNDS = 15


def recorder_cost(recorder: Recorder) -> float:
    """Microseconds of CPU per counted view spent in the recorder's two calls."""

    def view() -> None:
        recorder.request_handled(b"1", 0.0012)
        recorder.views_decided(REPLIES)

    best = min(timeit.repeat(view, number=CALLS, repeat=5, timer=time.process_time))
    return best / CALLS * 1e6


async def requests_cost(url: str, on: Recorder, off: Recorder) -> dict[str, list[float]]:
    """Microseconds of CPU per tracked request, per block, with the recorder on and off."""
    settings = Settings(redis_url=url, secret="metrics-bench-secret-0123")
    redis = connect_redis(settings)
    inner = ViewTracker(redis, None, settings)
    tracker = ResilientTracker(inner)
    app = ViewTrackingMiddleware(_plain_app, tracker=tracker, routes={"/stories/{id:int}": "story"})
    served = 0

    def scope() -> dict[str, Any]:
        nonlocal served
        n, served = served, served + 1
        return {
            "type": "http",
            "method": "GET",
            "path": f"/stories/{n % 1000}",
            "root_path": "",
            "headers": [(b"user-agent", f"Mozilla/5.0 metrics-{n % 500}".encode())],
            # A new client address per request: a new viewer, so the view counts.
            "client": (f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 40000),
        }

    async def block() -> float:
        scopes = [scope() for _ in range(BLOCK)]

        async def worker(first: int) -> None:
            for n in range(first, BLOCK, CONCURRENCY):
                await _drive(app, scopes[n])

        started = time.process_time()
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
        return (time.process_time() - started) / BLOCK * 1e6

    await block()  # warm: scripts, connections
    results: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(ROUNDS):
        order = [("on", on), ("off", off)] if round_ % 2 else [("off", off), ("on", on)]
        for name, recorder in order:
            app.metrics = inner.metrics = recorder
            results[name].append(await block())
    await tracker.aclose()
    await redis.aclose()
    return results


def main() -> None:
    on, off = PrometheusRecorder(CollectorRegistry()), Recorder()
    print(f"recorder calls, metrics on:  {recorder_cost(on):.2f} µs of CPU per counted view")
    print(f"recorder calls, metrics off: {recorder_cost(off):.2f} µs of CPU per counted view")
    with bench_redis_server() as server:
        results = asyncio.run(requests_cost(server.connection_url, on, off))
        # The same comparison with metrics off on both sides: how far apart two identical
        # setups measure on this machine (the noise the figure above must be read against).
        control = asyncio.run(requests_cost(server.connection_url, Recorder(), off))
    for name, values in results.items():
        print(
            f"tracked requests, metrics {name}: median {statistics.median(values):.1f} µs, "
            f"best {min(values):.1f} µs of CPU per request"
        )
    print(f"added by metrics (median of paired blocks): {_added(results):.1f} µs per request")
    print(f"control, metrics off against off:           {_added(control):.1f} µs per request")


def _added(results: dict[str, list[float]]) -> float:
    return statistics.median(a - b for a, b in zip(results["on"], results["off"], strict=True))


if __name__ == "__main__":
    main()
