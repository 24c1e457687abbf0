"""A bad ``VIEWMW_*`` variable stops ``dramatiq viewmw.jobs`` and ``periodiq viewmw.jobs`` at
start-up with one line naming it, never a traceback, and a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "dramatiq": [
        sys.executable,
        "-m",
        "dramatiq",
        "viewmw.jobs",
        "--processes",
        "1",
        "--threads",
        "1",
    ],
    # periodiq has no ``__main__``: its console script, next to this interpreter.
    "periodiq": [str(Path(sys.executable).parent / "periodiq"), "viewmw.jobs"],
}

pytestmark = pytest.mark.slow


def start(command: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    # A broker at a closed port: the process must stop before it tries to reach anything.
    env.update(VIEWMW_BROKER_URL="redis://127.0.0.1:1/0", **variables)
    return subprocess.run(
        COMMANDS[command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "VIEWMW_SYNC_CRON",
            "0 25 * * *",
            "viewmw: VIEWMW_SYNC_CRON is not a cron expression (minute hour day month weekday): "
            "'0 25 * * *'",
        ),
        (
            "VIEWMW_MAX_VIEWS_PER_SESSION",
            "lots",
            "viewmw: VIEWMW_MAX_VIEWS_PER_SESSION must be a whole number, 0, or 'none' "
            "(got 'lots')",
        ),
    ],
)
def test_a_bad_variable_stops_the_process_with_one_line(
    command: str, variable: str, value: str, message: str
) -> None:
    result = start(command, **{variable: value})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if variable in line] == [message]
