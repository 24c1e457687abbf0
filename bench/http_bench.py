"""HTTP throughput and latency: uvicorn serving the same site with and without viewmw, under wrk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    # name: (uvicorn app, path wrk requests)
    "bare app": ("bench.http_apps:bare", "/stories/"),
    "tracked route": ("bench.http_apps:tracked", "/stories/"),
    "untracked route": ("bench.http_apps:tracked", "/about"),
    "naive baseline": ("bench.http_apps:naive", "/stories/"),
}
WRK_SCRIPT = """
request = function()
  local path = "{path}"
  if path == "/stories/" then path = path .. math.random(1, 1000) end
  return wrk.format("GET", path, {{["User-Agent"] = "Mozilla/5.0 bench-" .. math.random(1, 500)}})
end
"""


@dataclass
class HttpFigures:
    """Median over rounds of requests/s and latency percentiles (ms) for one variant."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float


def require_wrk() -> str:
    """The path of wrk, or exit with how to install it."""
    path = shutil.which("wrk")
    if path is None:
        sys.exit("nox -s bench needs the HTTP load generator wrk: apt-get install wrk")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"uvicorn did not start on port {port}")


def _milliseconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _wrk(wrk: str, port: int, path: str, seconds: int, connections: int) -> HttpFigures:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(path=path))
    try:
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _milliseconds(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _milliseconds(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return HttpFigures(rps, p50, p99)


def run_http_bench(
    env: dict[str, str], *, rounds: int = 3, seconds: int = 5, connections: int = 32
) -> dict[str, HttpFigures]:
    """Serve each variant in turn, ``rounds`` times in alternation; medians per variant."""
    wrk = require_wrk()
    samples: dict[str, list[HttpFigures]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (app, path) in VARIANTS.items():
            port = _free_port()
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    app,
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env={**os.environ, **env},
            )
            try:
                _wait_for(port, time.monotonic() + 30)
                _wrk(wrk, port, path, 1, connections)  # warm-up: caches, connections, scripts
                samples[name].append(_wrk(wrk, port, path, seconds, connections))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
    return {
        name: HttpFigures(
            statistics.median(s.requests_per_second for s in runs),
            statistics.median(s.p50_ms for s in runs),
            statistics.median(s.p99_ms for s in runs),
        )
        for name, runs in samples.items()
    }
