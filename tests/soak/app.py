"""The app the soak serves with ``uvicorn tests.soak.app:app --workers 2``.

Two content types on pages that do nothing else: ``story`` (its own table, ``stories``) and
``task`` (viewmw's generic table). The viewer is the ``X-Soak-User`` header's number when it is
set, else an anonymous viewer (client address and user agent). Settings come from ``VIEWMW_*``;
the debug header says what each response's view became, for the soak to add up.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from viewmw import ViewTrackingMiddleware

ROUTES = {"/stories/{id:int}": "story", "/tasks/{slug}": ("task", "slug")}
DEBUG_HEADER = "X-View-Counted"


def soak_viewer(scope: Scope) -> str | None:
    """The ``X-Soak-User`` header (digits: an opaque user id), or ``None`` (anonymous)."""
    for name, value in scope["headers"]:
        if name == b"x-soak-user":
            return value.decode("latin-1")
    return None


async def page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/", page),  # untracked: the soak waits for it to answer
        Route("/stories/{id:int}", page),
        Route("/tasks/{slug}", page),
    ],
    middleware=[
        # The tables exist before the processes start: two workers creating them at once race.
        Middleware(
            ViewTrackingMiddleware,
            routes=ROUTES,
            debug_header=DEBUG_HEADER,
            viewer=soak_viewer,
            create_tables=False,
        )
    ],
)
