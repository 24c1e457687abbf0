"""Counts inside request handlers and templates: ``track(request)``, ``view_counts(...)``.

:class:`~viewmw.ViewTrackingMiddleware` puts one :class:`RequestView` in the scope of each
request it sees (``scope["viewmw"]``) and, for the requests of its routes, on ``request.state``
too (``request.state.viewmw``). The view is decided once, by whichever comes first: a handler's
``await track(request)`` (so the page can show a count that includes its own view) or the start
of the response. The other one then reuses that outcome: a view is never offered twice.

Nothing here imports FastAPI: :func:`track` and :func:`view_counter` are plain async callables
taking a Starlette ``Request``, which is what ``fastapi.Depends`` expects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.types import Scope

from viewmw.errors import InvalidKeyError, MiddlewareMissingError
from viewmw.keys import validate_content_id, validate_content_type
from viewmw.routes import RouteMatch

if TYPE_CHECKING:
    from viewmw.middleware import ViewTrackingMiddleware

SCOPE_KEY = "viewmw"
"""Where the middleware puts a request's :class:`RequestView`: ``scope[SCOPE_KEY]``, and
``request.state.viewmw`` for the requests of its routes."""

# (count, debug header value) as the middleware decides them.
_Values = tuple[int | None, bytes]
_COUNTED = b"1"
_QUEUED = b"1; queued"
_REASON = b"0; reason="
# A decision cut short (its caller was cancelled): the view may have been offered, so it is
# never offered again; the script Redis runs decides it, as for a late reply.
_UNKNOWN: _Values = (None, b"0; reason=unavailable")
_ERROR: _Values = (None, b"0; reason=error")
_STATUS: _Values = (None, b"0; reason=status")
_NOT_TRACKED: _Values = (None, b"0; reason=not_tracked")


class RequestView:
    """One request's view as viewmw decides it: ``request.state.viewmw``, or what
    :func:`track` returns.

    Undecided (:attr:`decided` false) until :func:`track` runs or the response starts; after
    that it never changes. The attributes mean what the debug header says
    (see docs/handlers.md).
    """

    __slots__ = ("_deciding", "_match", "_middleware", "_values")

    def __init__(
        self,
        middleware: ViewTrackingMiddleware,
        match: RouteMatch | None,
        values: _Values | None = None,
    ) -> None:
        self._middleware = middleware
        self._match = match
        self._values = values
        # None: nobody is deciding; True: one call is, alone; a future: others wait for it.
        self._deciding: Literal[True] | asyncio.Future[_Values] | None = None

    @classmethod
    def untracked(cls, middleware: ViewTrackingMiddleware) -> RequestView:
        """The view of every request the middleware does not count (one object, shared)."""
        return cls(middleware, None, _NOT_TRACKED)

    @property
    def content_type(self) -> str | None:
        """The content type of the route, or ``None`` for a request the middleware does not
        track."""
        return None if self._match is None else self._match.content_type

    @property
    def content_id(self) -> str | None:
        """The content id from the path, as text, or ``None`` for a request not tracked."""
        return None if self._match is None else self._match.content_id

    @property
    def tracked(self) -> bool:
        """Whether the middleware tracks this request (a ``GET`` of one of its routes)."""
        return self._match is not None

    @property
    def decided(self) -> bool:
        """Whether the view has been decided (by :func:`track` or the start of the response)."""
        return self._values is not None

    @property
    def counted(self) -> bool:
        """Whether this view was counted (``X-View-Count`` then includes it)."""
        return self._values is not None and self._values[1] == _COUNTED

    @property
    def queued(self) -> bool:
        """Redis was unreachable: the view waits in the outage outbox; the rules decide it when
        it is replayed."""
        return self._values is not None and self._values[1] == _QUEUED

    @property
    def count(self) -> int | None:
        """The combined count after this view, as ``X-View-Count`` shows it; ``None`` before the
        decision, or when it could not be read."""
        return None if self._values is None else self._values[0]

    @property
    def reason(self) -> str | None:
        """Why the view was not counted (the debug header's reason: ``cooldown``, ``bot``,
        ``not_tracked``…); ``None`` when counted, queued or not decided yet."""
        if self._values is None or not self._values[1].startswith(_REASON):
            return None
        return self._values[1][len(_REASON) :].decode("ascii")

    def __repr__(self) -> str:
        if self._values is None:
            return f"<RequestView {self.content_type}:{self.content_id} undecided>"
        return (
            f"<RequestView {self.content_type}:{self.content_id} count={self.count} "
            f"counted={self.counted} queued={self.queued} reason={self.reason}>"
        )

    async def decide(
        self, scope: Scope, *, counts: bool = True, wait: bool = False
    ) -> tuple[int | None, bytes]:
        """The count and debug header value of this view, offering it on the first call only
        (:func:`track` and the middleware's response start call this).

        ``counts`` false (a status the middleware does not count) decides "not counted" unless
        the view was offered already. ``wait`` waits for Redis even in the deferred mode. Never
        raises but ``CancelledError``.
        """
        if self._values is not None:
            return self._values
        if self._deciding is not None:  # another call is deciding it: share its outcome
            if self._deciding is True:
                self._deciding = asyncio.get_running_loop().create_future()
            waiter = self._deciding
            return await asyncio.shield(waiter)
        if not counts:
            self._values = _STATUS
            return _STATUS
        assert self._match is not None  # only the untracked view has no match, and it is decided
        self._deciding = True
        values = _UNKNOWN
        started = time.perf_counter()
        try:
            values = await self._middleware._outcome(scope, self._match, wait=wait)
        except Exception as exc:  # a malformed scope: the page must still render
            self._middleware.errors.report(exc)
            values = _ERROR
        finally:
            self._values = values
            if isinstance(self._deciding, asyncio.Future):
                self._deciding.set_result(values)
        self._middleware.metrics.request_handled(values[1], time.perf_counter() - started)
        return values

    async def read_counts(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, int]:
        """See :func:`view_counts`."""
        content_type = validate_content_type(content_type)
        if isinstance(content_ids, str | bytes):
            raise TypeError("content_ids must be a sequence of ids, not one id")
        ids: list[str] = []
        for content_id in content_ids:
            try:
                ids.append(validate_content_id(content_id))
            except InvalidKeyError:
                continue  # never tracked, so no count: left out like an unreadable one
        if not ids:
            return {}
        try:
            details = await self._middleware.tracker.get_view_count_details(content_type, ids)
        except Exception as exc:  # counts are decoration: the page renders without them
            self._middleware.errors.report(exc)
            return {}
        return {
            content_id: total
            for content_id, count in details.items()
            if isinstance(total := getattr(count, "total", None), int)
        }


def request_view(request: Request) -> RequestView:
    """The :class:`RequestView` the middleware put on this request.

    Raises:
        MiddlewareMissingError: no :class:`~viewmw.ViewTrackingMiddleware` handled this request.
    """
    view: Any = request.scope.get(SCOPE_KEY)
    if not isinstance(view, RequestView):
        raise MiddlewareMissingError(
            "no ViewTrackingMiddleware handled this request: wrap the app in it "
            "(app.add_middleware(ViewTrackingMiddleware, routes=...)) before calling "
            "track() or reading counts from a request"
        )
    return view


async def track(request: Request) -> RequestView:
    """Decide this request's view now, before the page renders, and return it.

    The returned view's :attr:`~RequestView.count` includes this view when it was counted, and
    is the number ``X-View-Count`` will carry: the middleware does not offer the view again.
    Calling it twice, or from two tasks at once, offers the view once. It waits for Redis even
    in the deferred mode. For a request the middleware does not track (not a ``GET``, or no
    route matches) nothing is offered: the view says ``tracked`` false, reason
    ``not_tracked``. The view is offered whatever status the handler answers afterwards, so
    call it once the page is known to exist.

    Works as a FastAPI dependency: ``view: RequestView = Depends(track)``.

    Raises:
        MiddlewareMissingError: no :class:`~viewmw.ViewTrackingMiddleware` handled this request.
    """
    view = request_view(request)
    await view.decide(request.scope, wait=True)
    return view


async def view_counts(
    request: Request, content_type: str, content_ids: Sequence[str | int]
) -> dict[str, int]:
    """The combined counts of many contents, with the middleware's tracker, without counting.

    One Redis round trip, plus at most one SQL query for counts not cached in Redis: the helper
    for a list page. Returns a dict keyed by the ids as text, in the order given. Ids whose count
    cannot be read now (Redis or the database failing or late) are left out, and so are ids that
    can never be tracked (not a valid key); if no count can be read, the dict is empty. Failures
    are logged like the middleware's own.

    Raises:
        MiddlewareMissingError: no :class:`~viewmw.ViewTrackingMiddleware` handled this request.
        InvalidKeyError: ``content_type`` is not a valid content type.
        TypeError: ``content_ids`` is one id (a string), not a sequence of them.
    """
    return await request_view(request).read_counts(content_type, content_ids)


class ViewCounter:
    """Reads counts with the middleware's tracker: ``await counter("story", ids)``.

    What the FastAPI dependency :func:`view_counter` gives a handler.
    """

    __slots__ = ("_view",)

    def __init__(self, view: RequestView) -> None:
        self._view = view

    async def __call__(self, content_type: str, content_ids: Sequence[str | int]) -> dict[str, int]:
        """Like :func:`view_counts`."""
        return await self._view.read_counts(content_type, content_ids)


async def view_counter(request: Request) -> ViewCounter:
    """A FastAPI dependency: ``counts: ViewCounter = Depends(view_counter)``, then
    ``await counts("story", ids)`` reads every count of a list page in one round trip.

    Raises:
        MiddlewareMissingError: no :class:`~viewmw.ViewTrackingMiddleware` handled this request.
    """
    return ViewCounter(request_view(request))
