"""No silent local database: with a real Redis and no database URL, nothing starts quietly.

The embedded SQLite file serves only with the embedded Redis (the example app). Otherwise the
middleware, the worker and every command (``tests/test_cli.py``) say what to set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.asgi_support import plain_app
from tests.conftest import CONTENT_TABLES
from tests.support import REDIS_URL
from viewmw import Settings
from viewmw.errors import ConfigurationError
from viewmw.middleware import ViewTrackingMiddleware

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {"/stories/{id:int}": "story"}


@pytest.mark.parametrize("content_tables", [None, CONTENT_TABLES], ids=["settings", "in-code"])
def test_the_middleware_refuses_to_start_without_a_database_url(
    content_tables: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(redis_url=REDIS_URL, secret="no-database-secret-0123")
    with pytest.raises(ConfigurationError, match="set VIEWMW_DATABASE_URL"):
        ViewTrackingMiddleware(
            plain_app(),
            routes=ROUTES,
            settings=settings,
            content_tables=content_tables,  # type: ignore[arg-type]
        )
    assert list(tmp_path.iterdir()) == []


async def test_the_embedded_pair_still_runs_without_any_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    middleware = ViewTrackingMiddleware(plain_app(), routes=ROUTES, settings=Settings())
    try:
        store = middleware.tracker.tracker.store  # type: ignore[attr-defined]
        assert str(store.engine.url) == "sqlite+aiosqlite:///viewmw.sqlite3"
    finally:
        await middleware.aclose()


def test_the_worker_stops_at_start_up_saying_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env.update(VIEWMW_REDIS_URL=REDIS_URL, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", "import viewmw.jobs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("viewmw: database_url is not set: set VIEWMW_DATABASE_URL")
    assert list(tmp_path.iterdir()) == []
