"""The FastAPI dependencies: Depends(track) on a detail page, Depends(view_counter) on a list page,
in a FastAPI app on the real Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from tests.asgi_support import CLIENT_HOST, USER_AGENT
from tests.test_handlers import Spy, header_count
from viewmw import (
    RequestView,
    ViewCounter,
    ViewTracker,
    ViewTrackingMiddleware,
    track,
    view_counter,
)

BROWSER = {"user-agent": USER_AGENT}
STORIES = {1: "The Lighthouse Keeper", 2: "A Map of Small Rivers", 3: "Night Train"}


def user_from_header(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-user":
            return str(value.decode())
    return None


async def also_tracks(view: Annotated[RequestView, Depends(track, use_cache=False)]) -> int | None:
    """A second dependency that tracks too (uncached): the view is still offered once."""
    return view.count


def make_app(tracker: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        ViewTrackingMiddleware,
        tracker=tracker,
        routes={"/stories/{story_id:int}": ("story", "story_id")},
        debug_header="X-View-Counted",
        viewer=user_from_header,
    )

    @app.get("/stories/{story_id}")
    async def story(
        story_id: int,
        view: Annotated[RequestView, Depends(track)],
        again: Annotated[int | None, Depends(also_tracks)],
    ) -> dict[str, Any]:
        if story_id not in STORIES:
            raise HTTPException(404, "no such story")
        return {"title": STORIES[story_id], "views": view.count, "again": again}

    @app.get("/stories")
    async def stories(counts: Annotated[ViewCounter, Depends(view_counter)]) -> dict[str, Any]:
        shown = await counts("story", list(STORIES))
        return {title: shown.get(str(story_id)) for story_id, title in STORIES.items()}

    @app.get("/about")
    async def about(request: Request, view: Annotated[RequestView, Depends(track)]) -> Any:
        return {"tracked": view.tracked, "reason": view.reason, "path": request.url.path}

    return app


@pytest.fixture
def spy(tracker: ViewTracker) -> Spy:
    return Spy(tracker)


@pytest.fixture
async def api(spy: Spy) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(make_app(spy), client=(CLIENT_HOST, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_depends_track_shows_the_count_that_includes_this_view(
    api: httpx.AsyncClient, spy: Spy, tracker: ViewTracker
) -> None:
    pages = [
        await api.get("/stories/2", headers={**BROWSER, "x-user": user})
        for user in ("ann", "ben", "ann")
    ]
    assert [(p.json()["views"], p.json()["again"]) for p in pages] == [(1, 1), (2, 2), (2, 2)]
    assert [p.json()["views"] for p in pages] == [header_count(p) for p in pages]
    assert [p.headers["x-view-counted"] for p in pages] == ["1", "1", "0; reason=cooldown"]
    # Two dependencies tracked each request; each view was offered once.
    assert len(spy.offered) == 3
    assert await tracker.get_view_count("story", 2) == 2


async def test_depends_view_counter_reads_the_list_in_one_call(
    api: httpx.AsyncClient, spy: Spy
) -> None:
    for user in ("ann", "ben"):
        await api.get("/stories/3", headers={**BROWSER, "x-user": user})
    await api.get("/stories/1", headers=BROWSER)
    spy.reads.clear()
    listing = await api.get("/stories")
    assert listing.json() == {
        "The Lighthouse Keeper": 1,
        "A Map of Small Rivers": 0,
        "Night Train": 2,
    }
    assert spy.reads == [("story", ["1", "2", "3"])]


async def test_a_dependency_tracks_before_the_handler_decides_the_page_exists(
    api: httpx.AsyncClient, tracker: ViewTracker
) -> None:
    missing = await api.get("/stories/99", headers=BROWSER)
    # Depends(track) ran before the handler refused: the view was offered, and the header says so.
    assert missing.status_code == 404
    assert (header_count(missing), missing.headers["x-view-counted"]) == (1, "1")
    assert await tracker.get_view_count("story", 99) == 1


async def test_depends_track_on_a_route_the_middleware_does_not_track(
    api: httpx.AsyncClient, spy: Spy
) -> None:
    response = await api.get("/about", headers=BROWSER)
    assert response.json() == {"tracked": False, "reason": "not_tracked", "path": "/about"}
    assert spy.offered == []


def test_the_library_never_imports_fastapi() -> None:
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, viewmw, viewmw.handlers; print('fastapi' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "False"
