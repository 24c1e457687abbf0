"""The ``viewmw`` command: in-process through ``main()``, and as the installed console script.

``main()`` runs ``asyncio.run``, so these tests are synchronous; they prepare and check Redis and
the database with clients of their own, each in its own ``asyncio.run``. ``sync --enqueue`` with a
working broker is tested under ``tests/jobs/`` (it imports ``viewmw.jobs``, which needs that
directory's environment); here it only meets brokers that are down, in subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from redis.asyncio import Redis
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from tests.support import DATABASE_URL, REDIS_URL, FakeClock
from viewmw import KeySchema, Outbox, OutboxEvent, Settings, Store, ViewTracker
from viewmw import metadata as viewmw_metadata
from viewmw.cli import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, main
from viewmw.sync import ViewSync

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
KEYS = KeySchema()
DAY = 86400.0
CLI_ENV = {
    "VIEWMW_REDIS_URL": REDIS_URL,
    "VIEWMW_DATABASE_URL": DATABASE_URL,
    "VIEWMW_CONTENT_TABLES": "story=stories.view_count,fantasy=fantasies.view_count",
    "VIEWMW_TIMEZONE": "Europe/Paris",
}
REDIS_DOWN = "redis://127.0.0.1:1/0"
DATABASE_DOWN = "postgresql://postgres@127.0.0.1:1/viewmw"
Content = tuple[str, str]


def test_exit_codes_are_the_documented_ones() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_BUSY) == (0, 1, 2, 75)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Only the test servers' ``VIEWMW_*`` variables are set."""
    for name in [name for name in os.environ if name.startswith("VIEWMW_")]:
        monkeypatch.delenv(name)
    for name, value in CLI_ENV.items():
        monkeypatch.setenv(name, value)
    yield monkeypatch


@pytest.fixture
def services(
    real_redis: aioredis.Redis, pg_store: Store, environment: pytest.MonkeyPatch
) -> Settings:
    """An empty test Redis database and fresh tables; the settings the command will read."""
    return Settings.from_env(CLI_ENV)


def run(action: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(action())  # type: ignore[arg-type]


@asynccontextmanager
async def connected(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[ViewTracker]:
    redis = Redis.from_url(REDIS_URL)
    store = Store.from_settings(settings)
    try:
        # Generous deadlines: on a busy machine a late reply must not lose a count read here.
        generous = settings.replace(redis_timeout=5.0, database_request_timeout=5.0)
        yield ViewTracker(redis, store, generous, clock=clock)
    finally:
        await redis.aclose()
        await store.close()


def record(
    settings: Settings, views: dict[Content, int], clock: Callable[[], float] = time.time
) -> None:
    """Count ``views[(type, id)]`` views of each content, each by another viewer."""

    async def go() -> None:
        async with connected(settings, clock) as tracker:
            stories = [int(i) for (t, i) in views if t == "story"]
            if stories:
                assert tracker.store is not None
                async with tracker.store.engine.begin() as connection:
                    await connection.execute(
                        text("INSERT INTO stories (id) VALUES (:id) ON CONFLICT DO NOTHING"),
                        [{"id": i} for i in stories],
                    )
            for (content_type, content_id), amount in views.items():
                for n in range(amount):
                    result = await tracker.track_view(content_type, content_id, f"user:r{n}")
                    assert result.counted, result

    run(go)


def counts(settings: Settings, contents: list[Content]) -> tuple[dict[Content, int], ...]:
    """(database counts, views in Redis) of each content."""

    async def go() -> tuple[dict[Content, int], dict[Content, int]]:
        async with connected(settings) as tracker:
            database = {c: await tracker.get_database_view_count(*c) for c in contents}
            in_redis = {c: await tracker.get_redis_view_count(*c) for c in contents}
            return database, in_redis

    return run(go)


def redis_call(method: str, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        client = Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            return await getattr(client, method)(*args, **kwargs)
        finally:
            await client.aclose()

    return run(go)


def daily_keys(day: float, settings: Settings) -> list[str]:
    date = time.strftime("%Y-%m-%d", time.gmtime(day))  # noon UTC: the same date in Paris
    return sorted(redis_call("keys", KEYS.daily_views_pattern.replace("*", f"*:{date}")))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# Commands ---------------------------------------------------------------------------------------

VIEWS: dict[Content, int] = {("story", "1"): 3, ("article", "x-1"): 2}
SUMMARY = re.compile(
    r"synced (\d+) views of (\d+) contents in (\d+) batches \((\d+) recovered\) in \d+\.\d\ds"
    r"(; removed \d+ old tracking keys)?"
)


def summary(out: str) -> tuple[int, ...]:
    match = SUMMARY.fullmatch(one_line(out))
    assert match, out
    return tuple(int(group) for group in match.groups()[:4])


def test_sync_moves_pending_views_into_the_database(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)

    assert main(["sync"]) == EXIT_OK
    assert summary(capsys.readouterr().out) == (5, 2, 1, 0)
    assert counts(services, list(VIEWS)) == (VIEWS, dict.fromkeys(VIEWS, 0))

    assert main(["sync"]) == EXIT_OK  # nothing left to do
    assert summary(capsys.readouterr().out) == (0, 0, 0, 0)
    assert counts(services, list(VIEWS)) == (VIEWS, dict.fromkeys(VIEWS, 0))


def test_force_runs_the_cleanup_even_with_nothing_pending(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    two_days_ago = FakeClock(time.time() - 2 * DAY)
    two_days_ago.now -= two_days_ago.now % DAY - 12 * 3600  # noon UTC
    record(services, {("article", "old"): 1}, two_days_ago)

    async def sync_back_then() -> None:  # synced that day: its daily counter is not stale yet
        async with connected(services) as tracker:
            assert tracker.store is not None
            await ViewSync(tracker.redis, tracker.store, services, clock=two_days_ago).run()

    run(sync_back_then)
    assert len(daily_keys(two_days_ago.now, services)) == 1

    assert main(["sync"]) == EXIT_OK  # nothing pending: stops before the cleanup
    assert summary(capsys.readouterr().out) == (0, 0, 0, 0)
    assert len(daily_keys(two_days_ago.now, services)) == 1

    assert main(["sync", "--force"]) == EXIT_OK
    out = capsys.readouterr().out
    assert summary(out) == (0, 0, 0, 0)
    assert out.strip().endswith("; removed 1 old tracking keys")
    assert daily_keys(two_days_ago.now, services) == []


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of rich's tables in ``out``: first cell -> the other cells."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def test_stats_prints_limits_key_counts_and_the_last_syncs(
    services: Settings, environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("VIEWMW_MAX_VIEWS_PER_SESSION", "5")
    environment.setenv("VIEWMW_VIEW_COOLDOWN_SECONDS", "none")
    record(services, {("story", "1"): 2})
    assert main(["sync"]) == EXIT_OK
    record(services, {("article", "y"): 1})
    capsys.readouterr()

    assert main(["sync", "--stats"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "viewmw abuse prevention" in out and "last syncs" in out
    rows = table_rows(out)
    assert rows["max_views_per_session"] == ["5"]
    assert rows["view_cooldown_seconds"] == ["off"]
    assert rows["max_daily_views_per_user"] == ["100"]
    assert rows["timezone"] == ["Europe/Paris"]
    assert rows["pending_view_keys"] == ["1"]
    assert rows["dirty_contents"] == ["1"]
    assert rows["daily_limit_keys"] == ["2"]  # viewers r0 and r1, today
    synced = [cells for cells in rows.values() if len(cells) == 4]
    assert len(synced) == 1
    assert synced[0][2:] == ["1", "2"]  # one content, two views
    # Statistics only: nothing was synced.
    assert counts(services, [("article", "y")]) == ({("article", "y"): 0}, {("article", "y"): 1})

    assert main(["stats"]) == EXIT_OK
    assert capsys.readouterr().out == out


def test_init_db_creates_the_tables(services: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    tables = ["fantasies", "stories", *sorted(viewmw_metadata.tables)]

    async def existing() -> list[str]:
        store = Store.from_settings(services)
        try:
            async with store.engine.connect() as connection:
                names = await connection.run_sync(lambda c: inspect(c).get_table_names())
                return sorted(set(names) & set(tables))
        finally:
            await store.close()

    async def drop() -> None:
        store = Store.from_settings(services)
        try:
            async with store.engine.begin() as connection:
                for table in tables:
                    await connection.execute(text(f'DROP TABLE IF EXISTS "{table}"'))
        finally:
            await store.close()

    run(drop)
    assert run(existing) == []
    assert main(["init-db"]) == EXIT_OK
    assert one_line(capsys.readouterr().out) == "tables are ready"
    assert run(existing) == sorted(tables)
    assert main(["init-db"]) == EXIT_OK  # again: nothing to do, no error
    record(services, {("story", "4"): 1})
    assert main(["sync"]) == EXIT_OK
    assert counts(services, [("story", "4")])[0] == {("story", "4"): 1}


def test_cleanup_deletes_previous_days_daily_counters_only(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    noon = time.time() - time.time() % DAY + 12 * 3600
    past, future = FakeClock(noon - 2 * DAY), FakeClock(noon + 2 * DAY)
    record(services, {("article", "p"): 3}, past)
    record(services, {("article", "f"): 2}, future)
    assert len(daily_keys(past.now, services)) == 3
    future_keys = daily_keys(future.now, services)
    assert len(future_keys) == 2

    assert main(["cleanup"]) == EXIT_OK
    assert one_line(capsys.readouterr().out) == "removed 3 old tracking keys"
    assert daily_keys(past.now, services) == []
    assert daily_keys(future.now, services) == future_keys
    # The views themselves stay pending.
    contents = [("article", "p"), ("article", "f")]
    assert counts(services, contents)[1] == {("article", "p"): 3, ("article", "f"): 2}


# Exit codes -------------------------------------------------------------------------------------

COMMANDS = [["sync"], ["sync", "--force"], ["sync", "--stats"], ["stats"], ["cleanup"], ["init-db"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_redis_down_exits_2_saying_what_to_start(
    command: list[str], environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("VIEWMW_REDIS_URL", REDIS_DOWN)
    assert main(command) == EXIT_UNAVAILABLE
    out, err = capsys.readouterr()
    assert out == ""
    message = one_line(err)
    assert message.startswith(f"viewmw: Redis at {REDIS_DOWN} is not reachable (")
    assert "Start it (for example `redis-server --daemonize yes`)" in message
    assert message.endswith("or set VIEWMW_REDIS_URL.")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_database_down_exits_2_saying_what_to_start(
    command: list[str],
    services: Settings,
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    environment.setenv("VIEWMW_DATABASE_URL", DATABASE_DOWN)
    assert main(command) == EXIT_UNAVAILABLE
    out, err = capsys.readouterr()
    assert out == ""
    message = one_line(err)
    assert message.startswith(
        "viewmw: the database at postgresql+asyncpg://postgres@127.0.0.1:1/viewmw is not reachable"
    )
    assert message.endswith("Start it or set VIEWMW_DATABASE_URL.")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VIEWMW_REDIS_URL", "http://127.0.0.1:6379"),
        ("VIEWMW_DATABASE_URL", "mysql://root@127.0.0.1/app"),
        ("VIEWMW_TIMEZONE", "Mars/Olympus_Mons"),
        ("VIEWMW_MAX_VIEWS_PER_SESSION", "lots"),
        ("VIEWMW_SECRET", "short"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    variable: str,
    value: str,
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    environment.setenv(variable, value)
    assert main(["sync"]) == EXIT_UNAVAILABLE
    assert one_line(capsys.readouterr().err).startswith(f"viewmw: {variable} ")


def test_no_redis_url_exits_2_asking_for_it(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.delenv("VIEWMW_REDIS_URL")
    assert main(["sync"]) == EXIT_UNAVAILABLE
    assert one_line(capsys.readouterr().err).startswith("viewmw: VIEWMW_REDIS_URL is not set")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["sync", "--everything"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: viewmw" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["sync"], ["sync", "--force"]], ids=" ".join)
def test_a_sync_already_running_exits_75_and_touches_nothing(
    command: list[str], services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)
    redis_call("set", KEYS.sync_lock, "another-worker", px=60_000)

    assert main(command) == EXIT_BUSY
    assert one_line(capsys.readouterr().out) == "another sync is running; nothing done"
    assert redis_call("get", KEYS.sync_lock) == "another-worker"
    assert counts(services, list(VIEWS)) == (dict.fromkeys(VIEWS, 0), VIEWS)


def test_a_failed_sync_exits_1_and_the_next_one_finishes_it(
    services: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)

    async def refuse(*args: Any, **kwargs: Any) -> bool:
        raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))

    with monkeypatch.context() as patched:
        patched.setattr(Store, "commit_batch", refuse)
        assert main(["sync"]) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    message = one_line(err)
    assert message.startswith("viewmw: sync failed: ")
    assert "server closed the connection" in message
    assert message.endswith("(nothing is lost; run it again)")
    assert counts(services, list(VIEWS)) == (dict.fromkeys(VIEWS, 0), VIEWS)

    assert main(["sync"]) == EXIT_OK
    assert summary(capsys.readouterr().out) == (5, 2, 1, 1)  # the kept batch, recovered
    assert counts(services, list(VIEWS)) == (VIEWS, dict.fromkeys(VIEWS, 0))


# The installed command --------------------------------------------------------------------------


def viewmw_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("viewmw")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project (pip install -e '.[test]')")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    return subprocess.run(
        [str(script), *args],
        cwd=ROOT,
        env={**clean, **CLI_ENV, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_viewmw_command_syncs(services: Settings) -> None:
    record(services, VIEWS)
    result = viewmw_command("sync")
    assert result.returncode == EXIT_OK, result.stderr
    assert summary(result.stdout) == (5, 2, 1, 0)
    assert result.stderr == ""
    assert counts(services, list(VIEWS)) == (VIEWS, dict.fromkeys(VIEWS, 0))


def test_the_viewmw_command_with_redis_down_prints_one_line_and_exits_2() -> None:
    result = viewmw_command("sync", VIEWMW_REDIS_URL=REDIS_DOWN)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stdout == ""
    assert one_line(result.stderr).startswith(f"viewmw: Redis at {REDIS_DOWN} is not reachable")


@pytest.mark.parametrize(
    ("broker_url", "shown"),
    [
        ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
        ("amqp://guest:secret@127.0.0.1:1/", "amqp://guest:***@127.0.0.1:1/"),
    ],
)
def test_enqueue_with_the_broker_down_exits_2_saying_what_to_start(
    broker_url: str, shown: str
) -> None:
    result = viewmw_command("sync", "--enqueue", VIEWMW_BROKER_URL=broker_url)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stdout == ""
    message = one_line(result.stderr)
    assert message.startswith(f"viewmw: the broker at {shown} is not reachable (")
    assert message.endswith("Start it or set VIEWMW_BROKER_URL.")


# No silent local database, a lost lock ----------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_real_redis_without_a_database_url_exits_2_saying_what_to_set(
    command: list[str],
    services: Settings,
    environment: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    record(services, VIEWS)
    environment.delenv("VIEWMW_DATABASE_URL")
    environment.chdir(tmp_path)

    assert main(command) == EXIT_UNAVAILABLE

    out, err = capsys.readouterr()
    assert out == ""
    message = one_line(err)
    assert message.startswith("viewmw: database_url is not set: set VIEWMW_DATABASE_URL")
    assert "serves only with the embedded Redis" in message
    assert list(tmp_path.iterdir()) == [], "a local database file was created"
    assert counts(services, list(VIEWS)) == (dict.fromkeys(VIEWS, 0), VIEWS)  # still pending


def test_a_sync_that_loses_its_lock_exits_1_and_commits_nothing(
    services: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)

    def losing_sync(redis: Redis, store: Store, settings: Settings) -> ViewSync:
        async def expire(step: str) -> None:
            if step == "sealed":  # stands in for a stall longer than the lock time
                await redis.delete(KEYS.sync_lock)

        return ViewSync(redis, store, settings, on_step=expire)

    with monkeypatch.context() as patched:
        patched.setattr("viewmw.cli.ViewSync", losing_sync)
        assert main(["sync"]) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("viewmw: sync failed: the sync lock expired")
    assert counts(services, list(VIEWS)) == (dict.fromkeys(VIEWS, 0), VIEWS)

    assert main(["sync"]) == EXIT_OK
    assert summary(capsys.readouterr().out) == (5, 2, 1, 1)  # the sealed batch, recovered
    assert counts(services, list(VIEWS)) == (VIEWS, dict.fromkeys(VIEWS, 0))


def test_sync_replays_the_outbox_first_and_stats_show_it(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Views kept during a Redis outage by a web process that never came back: the command
    replays them through the rules, then syncs them."""

    async def keep_during_an_outage() -> None:
        store = Store.from_settings(services)
        try:
            outbox = Outbox(store.engine)
            now = time.time()
            for n, viewer in enumerate(["user:1", "user:2", "user:1"]):  # a refresh by user 1
                assert await outbox.add(OutboxEvent.new("article", "x-9", viewer, now + n))
        finally:
            await store.close()

    run(keep_during_an_outage)
    assert main(["sync", "--stats"]) == EXIT_OK
    assert re.search(r"outbox_events\s*│\s*3", capsys.readouterr().out)

    assert main(["sync"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "replayed 3 views kept during a Redis outage (2 counted)"
    assert summary(out[1]) == (2, 1, 1, 0)
    assert counts(services, [("article", "x-9")]) == (
        {("article", "x-9"): 2},
        {("article", "x-9"): 0},
    )
