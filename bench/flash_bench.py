"""A flash crowd over HTTP with Redis healthy: 400 simultaneous requests (200 new visitors and
200 refreshes by one visitor), three rounds, against uvicorn serving the tracked site.

Reports latency (p50/p99), the share of responses that carried a count, and whether the counts
came out exact (each round: +200 for the new visitors, +1 for the refreshing visitor in the first
round only) with the breaker never open.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CROWD = 200
ROUNDS = 3


@dataclass
class FlashFigures:
    """Latency and header figures of the flash-crowd rounds."""

    requests: int
    p50_ms: float
    p99_ms: float
    with_count: float
    exact: bool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _visit(client: httpx.AsyncClient, path: str, agent: str) -> tuple[float, bool]:
    started = time.perf_counter()
    response = await client.get(path, headers={"User-Agent": agent})
    response.raise_for_status()
    return time.perf_counter() - started, "x-view-count" in response.headers


async def _crowd(port: int) -> FlashFigures:
    limits = httpx.Limits(max_connections=2 * CROWD, max_keepalive_connections=2 * CROWD)
    latencies: list[float] = []
    with_count = 0
    exact = True
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60
    ) as client:
        story = f"/stories/{int(time.time()) % 100_000 + 200_000}"  # a story nobody viewed yet
        for round_number in range(ROUNDS):
            visits = [
                _visit(client, story, f"Mozilla/5.0 flash-{round_number}-{n}") for n in range(CROWD)
            ] + [_visit(client, story, "Mozilla/5.0 flash-refresher") for _ in range(CROWD)]
            results = await asyncio.gather(*visits)
            latencies += [seconds for seconds, _ in results]
            with_count += sum(1 for _, counted in results if counted)
            await asyncio.sleep(0.5)  # let late replies land before the count is read
            count = await client.get(story, headers={"User-Agent": "Googlebot/2.1"})  # not counted
            expected = (round_number + 1) * CROWD + 1
            exact = exact and count.headers.get("x-view-count") == str(expected)
    latencies.sort()
    return FlashFigures(
        requests=len(latencies),
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] * 1000,
        with_count=with_count / len(latencies),
        exact=exact,
    )


def run_flash_bench(env: dict[str, str]) -> FlashFigures:
    """Serve the tracked site with uvicorn and send it the flash crowd."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.http_apps:tracked",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return asyncio.run(_crowd(port))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
