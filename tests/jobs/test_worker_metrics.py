"""The worker's metrics: a real ``dramatiq viewmw.jobs`` with two worker processes exports the
sync's figures on ``VIEWMW_METRICS_PORT``, summed over its processes; the variable is checked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from tests.asgi_support import free_port
from tests.jobs import add_stories, database_counts, record
from tests.jobs.test_worker_e2e import ROOT, WORKER_SETTINGS, enqueue_sync
from tests.metrics_support import key, parse
from tests.support import REDIS_URL, FakeClock
from viewmw import ConfigurationError, Settings, Store, ViewTracker
from viewmw.jobs.settings import WorkerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEADLINE_SECONDS = 60.0
WORKER_OPTIONS = ("--processes", "2", "--threads", "1")


class Worker:
    """``dramatiq viewmw.jobs --processes 2`` with its metrics server on ``port``."""

    def __init__(self, port: int, directory: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
        env.update(
            WORKER_SETTINGS,
            VIEWMW_BROKER_URL=REDIS_URL,
            VIEWMW_METRICS_PORT=str(port),
            PROMETHEUS_MULTIPROC_DIR=str(directory),
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = log
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "viewmw.jobs", *WORKER_OPTIONS],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


async def test_the_worker_exports_its_syncs_on_its_metrics_port(
    real_redis: aioredis.Redis, pg_store: Store, tmp_path: Path
) -> None:
    await add_stories(pg_store, [1])
    settings = Settings.from_env(WORKER_SETTINGS)
    tracker = ViewTracker(real_redis, pg_store, settings, clock=FakeClock())
    await record(tracker, {("story", "1"): 4})
    directory = tmp_path / "prometheus"
    port = free_port()
    worker = Worker(port, directory, tmp_path / "worker.log")
    try:
        enqueue_sync(REDIS_URL)
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        synced = key("viewmw_sync_runs_total", outcome="success")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(int(DEADLINE_SECONDS / 0.1)):
                if worker.process.poll() is not None:
                    pytest.fail(f"the worker exited:\n{worker.output()}")
                try:
                    samples = parse((await client.get("/metrics")).text)
                except httpx.TransportError:
                    samples = {}  # the metrics server is starting
                if samples.get(synced):
                    break
                await _pause()
            else:
                pytest.fail(f"no sync in the worker's metrics; log:\n{worker.output()}")
    finally:
        worker.stop()
    assert await database_counts(pg_store, [("story", "1")]) == {("story", "1"): 4}
    assert samples[synced] == 1
    assert samples[key("viewmw_sync_views_moved_total")] == 4
    assert samples[key("viewmw_sync_duration_seconds_count")] == 1
    assert samples[key("viewmw_sync_last_success_timestamp_seconds")] > 0
    # Both worker processes export their metrics (the one that did not sync, zeros), summed.
    assert len(list(directory.glob("counter_*.db"))) == 2


async def _pause() -> None:
    await asyncio.sleep(0.1)


@pytest.mark.parametrize("value", ["0", "65536", "http", "-1"])
def test_a_bad_metrics_port_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError, match="VIEWMW_METRICS_PORT must be a TCP port"):
        WorkerSettings.from_env(
            Settings(), {"VIEWMW_BROKER_URL": "stub://", "VIEWMW_METRICS_PORT": value}
        )


def test_a_metrics_port_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'viewmw\[metrics\]'"):
        WorkerSettings.from_env(
            Settings(), {"VIEWMW_BROKER_URL": "stub://", "VIEWMW_METRICS_PORT": "9464"}
        )


def test_metrics_are_off_unless_a_port_is_set() -> None:
    worker = WorkerSettings.from_env(Settings(), {"VIEWMW_BROKER_URL": "stub://"})
    assert worker.metrics_port is None
