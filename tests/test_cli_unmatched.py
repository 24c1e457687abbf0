"""``viewmw unmatched``, and unmatched views in ``viewmw sync`` and ``viewmw sync --stats``.

On the real Redis and PostgreSQL, through ``main()`` as in ``test_cli.py`` (whose helpers and
fixtures this reuses). ``fantasy`` maps to the ``fantasies`` table, where no row exists.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from tests.test_cli import counts, environment, record, run, services, table_rows
from viewmw import Settings, Store
from viewmw.cli import EXIT_OK, main

__all__ = ["environment", "services"]  # fixtures shared with test_cli.py

VIEWS = {("story", "1"): 2, ("fantasy", "8"): 3, ("fantasy", "9"): 1}


def test_sync_reports_views_of_missing_rows_and_unmatched_lists_them(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)

    assert main(["sync"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("synced 6 views of 3 contents in 1 batches")
    assert out.strip().endswith(
        "; 4 views of 2 contents whose rows do not exist were kept (see `viewmw unmatched`)"
    )

    assert main(["unmatched"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "unmatched views: 4 views of 2 contents" in out
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")][:3]
        for line in out.splitlines()
        if line.startswith("│ fantasy")
    ]
    assert rows == [["fantasy", "8", "3"], ["fantasy", "9", "1"]]  # most views first

    assert main(["unmatched", "--json"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert (listed["unmatched_contents"], listed["unmatched_views"]) == (2, 4)
    assert [(e["content_type"], e["content_id"], e["view_count"]) for e in listed["unmatched"]] == [
        ("fantasy", "8", 3),
        ("fantasy", "9", 1),
    ]
    assert "moved" not in listed

    assert main(["sync", "--stats"]) == EXIT_OK
    stats = table_rows(capsys.readouterr().out)
    assert (stats["unmatched_contents"], stats["unmatched_views"]) == (["2"], ["4"])


def test_unmatched_retry_moves_views_into_rows_that_exist_now(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    record(services, VIEWS)
    assert main(["sync"]) == EXIT_OK

    async def insert_fantasy_8() -> None:
        store = Store.from_settings(services)
        try:
            async with store.engine.begin() as connection:
                await connection.execute(text("INSERT INTO fantasies (id) VALUES (8)"))
        finally:
            await store.close()

    run(insert_fantasy_8)
    capsys.readouterr()

    assert main(["unmatched", "--retry", "--json"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert listed["moved"] == [{"content_type": "fantasy", "content_id": "8", "view_count": 3}]
    assert [e["content_id"] for e in listed["unmatched"]] == ["9"]
    assert counts(services, [("fantasy", "8"), ("fantasy", "9")])[0] == {
        ("fantasy", "8"): 3,
        ("fantasy", "9"): 1,
    }

    assert main(["unmatched", "--retry"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "moved 0 views of 0 contents into their rows"


def test_unmatched_with_nothing_kept(
    services: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["unmatched"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == "no unmatched views"
