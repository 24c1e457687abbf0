"""The off-loop probe and health on a ``redis+cluster://`` URL: healthy while every primary answers
``PING``, not while one is killed, healthy again once it is back (a cluster of its own: the test
kills one of its primaries)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster_support import LocalCluster, local_cluster
from viewmw import BuiltTracker, RedisProbe, Settings
from viewmw.cli import EXIT_OK, EXIT_UNAVAILABLE, main
from viewmw.health import REDIS, HealthEndpoint, check_health
from viewmw.tracker import ViewTracker


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    with local_cluster() as cluster:
        yield cluster


async def test_probe_and_health_want_every_primary(
    own_cluster: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3"
    settings = Settings(
        redis_url=own_cluster.url, database_url=database_url, secret="cluster-secret-0123456789"
    )
    for name in [name for name in os.environ if name.startswith("VIEWMW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VIEWMW_REDIS_URL", own_cluster.url)
    monkeypatch.setenv("VIEWMW_DATABASE_URL", database_url)
    probe = RedisProbe(own_cluster.url, timeout=2.0, min_interval=0.0)
    built = BuiltTracker(settings)
    await built.startup()
    owned = built.tracker.tracker
    assert owned.store is not None
    endpoint = HealthEndpoint(owned.redis, owned.store, settings)
    transport = httpx.ASGITransport(endpoint)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            up = await _states(probe, owned, settings, client)
            own_cluster.kill(own_cluster.nodes[1])
            down = await _states(probe, owned, settings, client)
            down_command = await asyncio.to_thread(main, ["health", "--json"])
            down_output = capsys.readouterr().out
            own_cluster.restart(own_cluster.nodes[1])
            back = await _states(probe, owned, settings, client)
            back_command = await asyncio.to_thread(main, ["health", "--json"])
    finally:
        probe.close()
        await built.aclose()

    assert up == (True, True, "every primary answers PING", 200)
    assert down[:2] == (False, False) and down[3] == 503
    assert f"127.0.0.1:{own_cluster.nodes[1].port}" in down[2]  # names the primary that is down
    assert back == up
    assert (down_command, back_command) == (EXIT_UNAVAILABLE, EXIT_OK)
    assert json.loads(down_output)["checks"][REDIS]["ok"] is False


async def _states(
    probe: RedisProbe, owned: ViewTracker, settings: Settings, client: httpx.AsyncClient
) -> tuple[bool, bool, str, int]:
    """The probe's answer, the redis check's verdict and detail, and the endpoint's status."""
    assert owned.store is not None
    report = await check_health(owned.redis, owned.store, settings)
    redis_check = report.check(REDIS)
    status = (await client.get("/healthz")).status_code
    return await probe.healthy(), redis_check.ok, redis_check.detail, status
