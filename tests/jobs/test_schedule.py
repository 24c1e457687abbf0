"""The periodiq schedule: what periodiq itself will run, in which time zone, and its settings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pendulum
import pytest
from periodiq import CronSpec, PeriodiqMiddleware

from tests.jobs import Content, database_counts, record, redis_counts
from tests.support import REDIS_URL
from tests.test_settings import documented_variables
from viewmw import ConfigurationError, Settings, Store, ViewTracker
from viewmw.jobs import broker, cleanup_view_tracking, notify_sync_failure, sync_view_counts
from viewmw.jobs.broker import SCHEDULE_GRACE_SECONDS
from viewmw.jobs.broker import settings as job_settings
from viewmw.jobs.settings import DEFAULT_CLEANUP_CRON, DEFAULT_SYNC_CRON, WorkerSettings, parse_cron
from viewmw.settings import ENVIRONMENT

if TYPE_CHECKING:
    from tests.jobs.conftest import StubWorker

ZONE = pendulum.timezone(job_settings.timezone)
ROOT = Path(__file__).resolve().parents[2]


def schedule_of(actor: object) -> CronSpec:
    spec = actor.options["periodic"]  # type: ignore[attr-defined]
    assert isinstance(spec, CronSpec)
    return spec


def test_the_configured_zone_is_not_utc() -> None:
    # The zone checks below mean something only if local midnight is not UTC midnight.
    assert job_settings.timezone == "Europe/Paris"


def test_periodiq_schedules_the_sync_and_the_cleanup_and_nothing_else() -> None:
    periodic = {a.actor_name for a in broker.actors.values() if "periodic" in a.options}
    assert periodic == {sync_view_counts.actor_name, cleanup_view_tracking.actor_name}
    assert "periodic" not in notify_sync_failure.options
    assert str(schedule_of(sync_view_counts)) == DEFAULT_SYNC_CRON == "0 0 * * *"
    assert str(schedule_of(cleanup_view_tracking)) == DEFAULT_CLEANUP_CRON


def test_the_sync_fires_at_local_midnight_not_at_utc_midnight() -> None:
    spec = schedule_of(sync_view_counts)
    local_midnight = pendulum.datetime(2026, 1, 15, 0, 0, tz=ZONE)
    utc_midnight = pendulum.datetime(2026, 1, 15, 0, 0, tz="UTC")
    assert spec.validate(local_midnight)
    # periodiq compares the minute and hour of its local clock (pendulum.now()).
    assert not spec.validate(utc_midnight.in_timezone(ZONE))
    assert not spec.validate(local_midnight.add(minutes=1))


def test_periodiqs_clock_is_in_the_configured_zone() -> None:
    now = pendulum.now()
    assert now.timezone_name == job_settings.timezone
    next_run = schedule_of(sync_view_counts).next_valid_date(now)
    assert next_run == now.add(days=1).start_of("day")
    assert (next_run.hour, next_run.minute) == (0, 0)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # the night summer time begins (clocks jump from 02:00 to 03:00)
        (pendulum.datetime(2026, 3, 28, 18, 0, tz=ZONE), "2026-03-29T00:00:00+01:00"),
        (pendulum.datetime(2026, 3, 29, 18, 0, tz=ZONE), "2026-03-30T00:00:00+02:00"),
        # the night it ends
        (pendulum.datetime(2026, 10, 25, 18, 0, tz=ZONE), "2026-10-26T00:00:00+01:00"),
        # at midnight itself: the next run is the next day's
        (pendulum.datetime(2026, 7, 1, 0, 0, tz=ZONE), "2026-07-02T00:00:00+02:00"),
    ],
)
def test_next_runs_are_local_midnights_across_summer_time(
    after: pendulum.DateTime, expected: str
) -> None:
    assert schedule_of(sync_view_counts).next_valid_date(after).isoformat() == expected


def test_the_cleanup_runs_after_the_sync_each_night() -> None:
    sync, cleanup = schedule_of(sync_view_counts), schedule_of(cleanup_view_tracking)
    evening = pendulum.datetime(2026, 5, 4, 22, 0, tz=ZONE)
    for night in range(7):
        start = evening.add(days=night)
        next_sync, next_cleanup = sync.next_valid_date(start), cleanup.next_valid_date(start)
        assert next_sync < next_cleanup < next_sync.add(hours=1)
        assert next_cleanup.date() == next_sync.date()


def test_the_schedule_grace_is_six_hours() -> None:
    middleware = [m for m in broker.middleware if isinstance(m, PeriodiqMiddleware)]
    assert len(middleware) == 1
    assert middleware[0].skip_delay == SCHEDULE_GRACE_SECONDS == 6 * 3600


VIEWS: dict[Content, int] = {("article", "late"): 2}


@pytest.mark.parametrize(("hours_late", "runs"), [(5, True), (7, False)])
async def test_a_scheduled_sync_runs_when_the_worker_comes_back_within_the_grace(
    hours_late: int,
    runs: bool,
    pg_tracker: ViewTracker,
    pg_store: Store,
    stub_worker: StubWorker,
) -> None:
    """A worker down at midnight: periodiq's message waits in the queue and is processed when the
    worker is back, within the grace; after it, the next scheduled run catches up instead."""
    await record(pg_tracker, VIEWS)
    scheduled_at = pendulum.now().subtract(hours=hours_late).replace(microsecond=0)
    sync_view_counts.send_with_options(scheduled_at=str(scheduled_at))
    await stub_worker.drain()

    synced = dict.fromkeys(VIEWS, 0) | (VIEWS if runs else {})
    assert await database_counts(pg_store, list(VIEWS)) == synced
    assert await redis_counts(pg_tracker, list(VIEWS)) == (
        dict.fromkeys(VIEWS, 0) if runs else VIEWS
    )
    # The views a skipped run left behind are not tied to it: the next run takes them.
    sync_view_counts.send()
    await stub_worker.drain()
    assert await database_counts(pg_store, list(VIEWS)) == VIEWS


# Settings ----------------------------------------------------------------------------------------

BASE = Settings(redis_url=REDIS_URL)


def test_schedules_come_from_the_environment() -> None:
    worker = WorkerSettings.from_env(
        BASE, {"VIEWMW_SYNC_CRON": "15 3 * * *", "VIEWMW_CLEANUP_CRON": "45 3 * * *"}
    )
    assert worker.sync_schedule.validate(pendulum.datetime(2026, 2, 2, 3, 15, tz=ZONE))
    assert not worker.sync_schedule.validate(pendulum.datetime(2026, 2, 2, 0, 0, tz=ZONE))
    assert worker.cleanup_schedule.validate(pendulum.datetime(2026, 2, 2, 3, 45, tz=ZONE))
    assert worker.broker_url == REDIS_URL  # the broker defaults to VIEWMW_REDIS_URL


def test_a_weekly_schedule_on_sunday_fires_on_sunday() -> None:
    # periodiq alone never matches Sunday written as 0 (its validate() uses isoweekday()).
    sunday_midnight = pendulum.datetime(2026, 11, 29, 0, 0, tz=ZONE)
    for cron in ("0 0 * * 0", "0 0 * * 7", "0 0 * * sun", "@weekly", "0 0 * * 0-6"):
        spec = parse_cron(cron)
        assert spec.validate(sunday_midnight), cron
        assert spec.next_valid_date(sunday_midnight.subtract(days=1)) == sunday_midnight, cron
        assert str(spec) == cron
    weekdays = parse_cron("0 0 * * 1-5")
    assert not weekdays.validate(sunday_midnight)
    assert weekdays.next_valid_date(sunday_midnight) == sunday_midnight.add(days=1)
    # A day of the month and weekdays: either one matches, as in cron.
    first_or_not_saturday = parse_cron("0 0 1 * 0-5")
    assert first_or_not_saturday.validate(pendulum.datetime(2026, 8, 1, tz=ZONE))  # a Saturday
    assert not first_or_not_saturday.validate(sunday_midnight.subtract(days=1))  # Saturday 28th
    assert first_or_not_saturday.validate(sunday_midnight)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VIEWMW_SYNC_CRON", "every night"),
        ("VIEWMW_SYNC_CRON", "0 0 * *"),
        ("VIEWMW_SYNC_CRON", "0 0 * * * *"),
        ("VIEWMW_SYNC_CRON", "61 0 * * *"),
        ("VIEWMW_SYNC_CRON", "0 24 * * *"),
        ("VIEWMW_SYNC_CRON", "0 0 0 * *"),
        ("VIEWMW_SYNC_CRON", "0 0 * 13 *"),
        ("VIEWMW_SYNC_CRON", "0 0 * * 8"),
        ("VIEWMW_SYNC_CRON", "@sometimes"),
        ("VIEWMW_CLEANUP_CRON", "*/0 * * * *"),
        ("VIEWMW_BROKER_URL", "http://127.0.0.1:6379/0"),
        ("VIEWMW_BROKER_URL", "127.0.0.1:6379"),
        ("VIEWMW_FAILURE_HOOK", "not a hook"),
        ("VIEWMW_RETRY_MIN_BACKOFF_MS", "soon"),
        ("VIEWMW_RETRY_MIN_BACKOFF_MS", "0"),
        ("VIEWMW_SYNC_TIME_LIMIT_MS", "-5"),
        ("VIEWMW_METRICS_PORT", "http"),
    ],
)
def test_bad_worker_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        WorkerSettings.from_env(BASE, {variable: value})
    assert error.value.setting == variable
    assert str(error.value).startswith(variable)


def test_every_worker_variable_has_a_bad_value_above() -> None:
    marks = next(m for m in test_bad_worker_settings_name_the_variable.pytestmark)
    tried = {variable for variable, _ in marks.args[1]}
    assert tried == {v.name for v in ENVIRONMENT if v.group == "worker"}


def test_worker_variables_are_read_like_the_library_s() -> None:
    worker = WorkerSettings.from_env(
        BASE,
        {
            "VIEWMW_BROKER_URL": " stub:// ",
            "VIEWMW_SYNC_CRON": " 30 2 * * * ",
            "VIEWMW_FAILURE_HOOK": "",
            "VIEWMW_RETRY_MIN_BACKOFF_MS": " 250 ",
            "VIEWMW_METRICS_PORT": "",
        },
    )
    assert (worker.broker_url, worker.sync_cron, worker.failure_hook) == (
        "stub://",
        "30 2 * * *",
        None,
    )
    assert (worker.retry_min_backoff_ms, worker.metrics_port) == (250, None)


def test_configuration_docs_list_every_worker_variable_with_its_default() -> None:
    rows = documented_variables()
    for variable in (v for v in ENVIRONMENT if v.group == "worker"):
        assert variable.name in rows, f"{variable.name} is missing from docs/configuration.md"
        setting, default = rows[variable.name][0], rows[variable.name][1]
        assert setting.strip("`") == variable.field, variable.name
        field = WorkerSettings.__dataclass_fields__[variable.field]
        # The broker has no default of its own: unset, the worker uses VIEWMW_REDIS_URL.
        expected = None if field.default is dataclasses.MISSING else field.default
        text = "" if default == "(unset)" else default.strip("`")
        assert variable.parse(text) == expected, (variable.name, default)


def test_a_worker_needs_a_broker() -> None:
    with pytest.raises(ConfigurationError) as error:
        WorkerSettings.from_env(Settings(), {})
    assert error.value.setting == "VIEWMW_BROKER_URL"
    assert "VIEWMW_REDIS_URL" in str(error.value)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/3", "amqp://guest:guest@127.0.0.1:5672/", "stub://"]
)
def test_broker_urls(url: str) -> None:
    assert WorkerSettings.from_env(BASE, {"VIEWMW_BROKER_URL": url}).broker_url == url


def _import_jobs(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "VIEWMW_BROKER_URL": "stub://", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_importing_jobs_schedules_in_the_configured_cron_and_zone() -> None:
    """What ``dramatiq viewmw.jobs`` and ``periodiq viewmw.jobs`` see when they import it."""
    result = _import_jobs(
        {"VIEWMW_SYNC_CRON": "30 2 * * *", "VIEWMW_TIMEZONE": "America/New_York"},
        "import viewmw.jobs, pendulum\n"
        "spec = viewmw.jobs.sync_view_counts.options['periodic']\n"
        "print(spec, pendulum.now().timezone_name)\n"
        "print(spec.validate(pendulum.datetime(2026, 6, 1, 2, 30, tz='America/New_York')))\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["30 2 * * * America/New_York", "True"]


def test_importing_jobs_with_a_bad_cron_stops_naming_the_variable() -> None:
    result = _import_jobs({"VIEWMW_SYNC_CRON": "0 25 * * *"}, "import viewmw.jobs")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "viewmw: VIEWMW_SYNC_CRON is not a cron expression (minute hour day month weekday): "
        "'0 25 * * *'"
    ]
