"""``viewmw top`` and ``viewmw views``: tables, JSON, before and after a sync, bad periods."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_cli import environment, record, services
from viewmw import Settings
from viewmw.calendar_day import local_date
from viewmw.cli import EXIT_OK, main

__all__ = ["environment", "services"]  # fixtures, imported to be used here

VIEWS = {("story", "1"): 3, ("story", "2"): 5, ("story", "3"): 1}


def today(settings: Settings) -> str:
    """Today in the command's time zone (the services' ``VIEWMW_TIMEZONE``, not UTC: the two
    differ for an hour or two around midnight)."""
    return local_date(time.time(), settings.zone).isoformat()


@pytest.mark.parametrize("synced", [False, True], ids=["pending", "synced"])
def test_top_and_views_as_json(
    services: Settings, capsys: pytest.CaptureFixture[str], synced: bool
) -> None:
    record(services, VIEWS)
    if synced:
        assert main(["sync"]) == EXIT_OK
        capsys.readouterr()

    assert main(["top", "story", "--period", "7d", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == [
        {"content_id": "2", "views": 5},
        {"content_id": "1", "views": 3},
        {"content_id": "3", "views": 1},
    ]
    assert main(["top", "story", "--period", "today", "--limit", "1", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == [{"content_id": "2", "views": 5}]

    assert main(["views", "story", "2", "--period", "30d", "--by-day", "--json"]) == EXIT_OK
    days = json.loads(capsys.readouterr().out)
    assert len(days) == 30 and days[-1] == {
        "day": today(services),
        "views": 5,
        "unique_viewers": 5,
        "crawler_views": 0,
    }
    assert sum(day["views"] for day in days) == 5
    assert main(["views", "story", "2", "--period", "all", "--json"]) == EXIT_OK
    (total,) = json.loads(capsys.readouterr().out)
    assert (total["views"], total["unique_viewers"], total["last"]) == (5, 5, today(services))


def test_tables(services: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    record(services, VIEWS)
    assert main(["top", "story"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "most viewed story" in out
    assert "│ 1 │ 2  │     5 │" in out and "│ 3 │ 3  │     1 │" in out
    assert main(["views", "story", "1", "--by-day", "--period", "today"]) == EXIT_OK
    out = capsys.readouterr().out
    assert today(services) in out and "unique viewers" in out


@pytest.mark.parametrize("period", ["yesterday", "0d", "2026-12-01..2026-11-01", "7"])
def test_a_bad_period_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], period: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["top", "story", "--period", period])
    assert exit_info.value.code == 2
    assert "--period" in capsys.readouterr().err
