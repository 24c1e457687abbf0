"""Every Python example in the README and docs/ runs, so none of them rots."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8")), 1):
            found.append((f"{page.name}#{number}", match.group(1)))
    return found


EXAMPLES = examples()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize(("where", "source"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_runs(where: str, source: str, tmp_path: Path, real_redis: object) -> None:
    env = {
        **os.environ,
        "VIEWMW_REDIS_URL": REDIS_URL,
        "VIEWMW_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/docs.sqlite3",
        "VIEWMW_SECRET": "docs-example-secret-0123",
        "VIEWMW_BROKER_URL": "stub://",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("VIEWMW_CONTENT_TABLES", None)
    run = subprocess.run(
        [sys.executable, "-m", "tests.doc_runner"],
        input=source,
        text=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, f"{where} failed:\n{source}\n{run.stderr[-3000:]}"
