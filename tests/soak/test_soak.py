"""A bounded soak on a local Redis Cluster: ``uvicorn --workers 2`` serving tests/soak/app.py, two
Dramatiq workers, periodiq scheduling a sync every minute, and seeded traffic over HTTP from
thousands of viewers over 30 contents, the rules on (the defaults, but a daily limit of 8 that
viewers reach). At the end
the traffic stops, the web processes stop (writing any outbox events), one last ``viewmw sync``
runs, and the database must hold exactly the views the responses said were counted.

Marked ``soak`` and left out of the default run: ``nox -s soak`` runs it. ``VIEWMW_SOAK_SECONDS``
sets how long the traffic runs (default 180 s, at most 600); ``VIEWMW_SOAK_SEED`` its seed. The
broker is this run's own Redis database (a single Redis: Dramatiq's broker does not run on a
cluster), the database this run's own PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from tests.asgi_support import free_port
from tests.cluster_support import LocalCluster, local_cluster
from tests.soak.app import DEBUG_HEADER
from tests.support import DATABASE_URL, REDIS_URL
from viewmw import Outbox, Settings, Store
from viewmw.assembly import connect_redis_cluster

ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = min(float(os.environ.get("VIEWMW_SOAK_SECONDS", "180")), 600.0)
SEED = int(os.environ.get("VIEWMW_SOAK_SEED", "20261201"))
STORY_IDS = [str(n) for n in range(1, 21)]
TASK_SLUGS = [f"task-{n}" for n in range(1, 11)]
USERS = 2000  # numbered viewers; about one request in ten is anonymous
VISITORS = 16  # requests in flight at once
SECRET = "soak-secret-0123456789"
Content = tuple[str, str]

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_SECONDS + 600)]


@dataclass
class Tally:
    """What the responses said: views counted per content, and every debug header value."""

    counted: Counter[Content] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    def add(self, content: Content, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        outcome = response.headers.get(DEBUG_HEADER, "missing")
        self.outcomes[outcome] += 1
        if outcome == "1":
            self.counted[content] += 1

    @property
    def unknown(self) -> int:
        """Responses whose view is neither counted nor refused by a rule: queued for a replay,
        decided after the deadline, failed, or without a header."""
        return sum(n for outcome, n in self.outcomes.items() if not _decided(outcome))


def _decided(outcome: str) -> bool:
    """Whether a debug header value says the view was counted or refused by a rule."""
    if outcome == "1":
        return True
    return outcome.startswith("0; reason=") and outcome not in UNDECIDED


# Views whose outcome a response cannot tell: Redis did not answer in time, failed, or the
# deferred mode answered first.
UNDECIDED = ("0; reason=unavailable", "0; reason=error", "0; reason=deferred")


class Processes:
    """The soak's processes: each started with its own log file, stopped with SIGTERM by its id
    (then SIGKILL if it does not stop), the last started first."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[str, int] = {}

    def start(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.running[name] = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            self.exit_codes[name] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            self.exit_codes[name] = process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)

    def check_alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited ({process.returncode}):\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def soak_cluster() -> Iterator[LocalCluster]:
    with local_cluster() as cluster:
        yield cluster


async def test_soak_conserves_every_counted_view(
    soak_cluster: LocalCluster,
    pg_store: Store,
    real_redis: aioredis.Redis,  # the broker's database, flushed first
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with pg_store.engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO stories (id) VALUES (:id)"), [{"id": int(i)} for i in STORY_IDS]
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env.update(
        VIEWMW_REDIS_URL=soak_cluster.url,
        VIEWMW_DATABASE_URL=DATABASE_URL,
        VIEWMW_SECRET=SECRET,
        VIEWMW_CONTENT_TABLES="story=stories.view_count",
        VIEWMW_BROKER_URL=REDIS_URL,
        VIEWMW_SYNC_CRON="* * * * *",
        # Low enough that viewers reach it: the daily quota's places are taken and given back
        # across slots, by several processes at once.
        VIEWMW_MAX_DAILY_VIEWS_PER_USER="8",
        VIEWMW_RETRY_MIN_BACKOFF_MS="1000",
        # The soak is about conservation, not deadlines: no request gives up on a busy machine.
        VIEWMW_REDIS_TIMEOUT="5",
        VIEWMW_DATABASE_REQUEST_TIMEOUT="5",
    )
    settings = Settings.from_env(env)
    port = free_port()
    processes = Processes(tmp_path, env)
    tally = Tally()
    bin_dir = Path(sys.executable).parent
    try:
        processes.start(
            "web",
            [sys.executable, "-m", "uvicorn", "tests.soak.app:app", "--workers", "2",
             "--port", str(port), "--log-level", "warning"],
        )  # fmt: skip
        for n in (1, 2):
            processes.start(
                f"worker-{n}",
                [sys.executable, "-m", "dramatiq", "viewmw.jobs", "--processes", "1",
                 "--threads", "2"],
            )  # fmt: skip
        processes.start("scheduler", [str(bin_dir / "periodiq"), "viewmw.jobs"])
        base_url = f"http://127.0.0.1:{port}"
        await _wait_until_served(base_url, processes)

        started = time.monotonic()
        await _traffic(base_url, SOAK_SECONDS, tally)
        traffic_seconds = time.monotonic() - started
        processes.check_alive()
        scheduled = await _ledger(pg_store)

        processes.stop("web")  # writes outbox events still in memory
        processes.stop("scheduler")
        final = _final_sync(env, bin_dir)
        processes.stop_all()
    finally:
        processes.stop_all()

    contents = [("story", i) for i in STORY_IDS] + [("task", s) for s in TASK_SLUGS]
    store = Store.from_settings(settings)
    try:
        in_database = {c: await store.read_count(*c) for c in contents}
        unmatched = await store.unmatched_totals()
        outbox = (await Outbox(store.engine).stats())["outbox_events"]
    finally:
        await store.close()
    in_redis = await _left_in_redis(settings, contents)
    figures = {
        "seconds of traffic": round(traffic_seconds, 1),
        "requests": sum(tally.statuses.values()),
        "requests/s": round(sum(tally.statuses.values()) / traffic_seconds),
        "counted": sum(tally.counted.values()),
        "outcomes": dict(tally.outcomes.most_common()),
        "statuses": dict(tally.statuses),
        "scheduled syncs (minutes with a committed batch, batches)": scheduled,
        "final sync": final,
        "in the database": sum(in_database.values()),
        "exit codes": processes.exit_codes,
    }
    with capsys.disabled():
        print("\nsoak figures:", figures)

    assert tally.statuses == Counter({200: sum(tally.statuses.values())})
    assert tally.unknown == 0, tally.outcomes
    # Exact conservation: every content holds in the database what the responses counted.
    assert in_database == {c: tally.counted[c] for c in contents}
    assert in_redis == dict.fromkeys(contents, 0)
    assert (unmatched, outbox) == ((0, 0), 0)
    # The scheduled syncs ran while the traffic did (periodiq fires at each minute's start).
    assert scheduled[0] >= int(SOAK_SECONDS // 60) - 1


async def _wait_until_served(base_url: str, processes: Processes) -> None:
    """Poll the untracked page until both web workers answer (they start in another process:
    no clock to inject)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        for _ in range(600):
            processes.check_alive()
            try:
                if (await client.get("/")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the web processes never answered:\n{processes.log('web')}")


async def _traffic(base_url: str, seconds: float, tally: Tally) -> None:
    """``VISITORS`` seeded visitors, each sending one request after the other until ``seconds``
    have passed."""
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=VISITORS)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client,
        asyncio.TaskGroup() as group,
    ):
        for n in range(VISITORS):
            group.create_task(_visitor(client, random.Random(SEED * 1000 + n), deadline, tally))


async def _visitor(
    client: httpx.AsyncClient, rng: random.Random, deadline: float, tally: Tally
) -> None:
    while time.monotonic() < deadline:
        content: Content
        if rng.random() < 0.7:
            content = ("story", rng.choice(STORY_IDS))
            path = f"/stories/{content[1]}"
        else:
            content = ("task", rng.choice(TASK_SLUGS))
            path = f"/tasks/{content[1]}"
        version = 100 + rng.randrange(40)
        headers = {
            "user-agent": f"Mozilla/5.0 (X11; Linux x86_64; rv:{version}.0) "
            f"Gecko/20100101 Firefox/{version}.0"
        }
        if rng.random() < 0.9:
            headers["x-soak-user"] = str(rng.randrange(USERS))
        tally.add(content, await client.get(path, headers=headers))


async def _ledger(store: Store) -> tuple[int, int]:
    """Minutes in which a sync committed a batch, and the batches committed."""
    async with store.engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT count(DISTINCT date_trunc('minute', committed_at)), count(*) "
                    "FROM viewmw_sync_batches"
                )
            )
        ).one()
    return int(row[0]), int(row[1])


def _final_sync(env: dict[str, str], bin_dir: Path) -> str:
    """``viewmw sync`` until it runs (exit 75: a worker's scheduled sync holds the lock; waiting
    on another process, there is no clock to inject)."""
    for _ in range(120):
        result = subprocess.run(
            [str(bin_dir / "viewmw"), "sync"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 75:
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()
        time.sleep(1)
    raise AssertionError("the final sync never got the lock")


async def _left_in_redis(settings: Settings, contents: list[Content]) -> dict[Content, int]:
    """Pending and syncing views still in the cluster, per content."""
    client = connect_redis_cluster(settings)
    try:
        shards = settings.content_shards()
        left = {}
        for content_type, content_id in contents:
            keys = shards.of(content_type, content_id)
            pending = await client.get(keys.pending(content_type, content_id))
            syncing = await client.get(keys.syncing(content_type, content_id))
            left[(content_type, content_id)] = int(pending or 0) + int(syncing or 0)
        return left
    finally:
        await client.aclose()
