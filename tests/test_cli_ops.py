"""``viewmw --version``, the variables in ``--help``, ``--json`` statistics and ``viewmw health``.

In-process through ``main()`` with the fixtures of ``test_cli``: only the test servers'
``VIEWMW_*`` variables set, an empty Redis database and fresh tables.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.test_cli import (
    DATABASE_DOWN,
    REDIS_DOWN,
    environment,
    one_line,
    record,
    services,
)
from viewmw import Settings, __version__
from viewmw.cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, main
from viewmw.health import BACKLOG, DATABASE, LAST_SYNC, OUTBOX, REDIS
from viewmw.settings import ENVIRONMENT

__all__ = ["environment", "services"]  # fixtures, imported to be used here


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"viewmw {__version__}\n"


def test_help_lists_every_variable_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for variable in ENVIRONMENT:
        (line,) = [line for line in lines if line.split()[:1] == [variable.name]]
        assert line.split(None, 1)[1] == variable.help
    assert any("VIEWMW_BROKER_URL" in line for line in lines)


@pytest.mark.parametrize("command", [["stats", "--json"], ["sync", "--stats", "--json"]])
def test_stats_json_has_the_same_figures(
    command: list[str],
    services: Settings,
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    record(services, {("story", "1"): 2})
    assert main(["sync"]) == EXIT_OK
    record(services, {("article", "y"): 1})
    capsys.readouterr()

    assert main(command) == EXIT_OK
    stats = json.loads(capsys.readouterr().out)
    assert stats["max_views_per_session"] == 3
    assert stats["timezone"] == "Europe/Paris"
    assert stats["pending_view_keys"] == 1
    assert stats["dirty_contents"] == 1
    assert stats["outbox_events"] == 0
    assert (stats["unmatched_contents"], stats["unmatched_views"]) == (0, 0)
    (last,) = stats["last_syncs"]
    assert (last["contents"], last["views"]) == (1, 2)
    committed = datetime.fromisoformat(last["committed_at"])
    assert committed.utcoffset() is not None and committed.utcoffset().total_seconds() == 0


def test_health_of_a_working_deployment_exits_0(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert list(report["checks"]) == [REDIS, DATABASE, BACKLOG, LAST_SYNC, OUTBOX]
    assert main(["health"]) == EXIT_OK
    assert "viewmw health: ok" in capsys.readouterr().out


def test_health_with_a_large_backlog_exits_1(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, {("article", "a"): 1, ("article", "b"): 1})
    assert main(["health", "--json", "--max-pending", "1"]) == EXIT_FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [name for name, check in report["checks"].items() if not check["ok"]] == [BACKLOG]


@pytest.mark.parametrize(
    ("variable", "url", "failed"),
    [
        ("VIEWMW_REDIS_URL", REDIS_DOWN, [REDIS, BACKLOG]),
        ("VIEWMW_DATABASE_URL", DATABASE_DOWN, [DATABASE, LAST_SYNC, OUTBOX]),
    ],
)
def test_health_with_a_server_down_exits_2_and_says_which(
    variable: str,
    url: str,
    failed: list[str],
    services: Settings,
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    environment.setenv(variable, url)
    assert main(["health", "--json"]) == EXIT_UNAVAILABLE
    report = json.loads(capsys.readouterr().out)
    assert [name for name, check in report["checks"].items() if not check["ok"]] == failed


def test_health_with_a_bad_variable_exits_2_naming_it(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("VIEWMW_TIMEZONE", "Mars/Olympus_Mons")
    assert main(["health"]) == EXIT_UNAVAILABLE
    assert one_line(capsys.readouterr().err).startswith("viewmw: VIEWMW_TIMEZONE ")
