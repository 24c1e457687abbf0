"""ViewTrackingMiddleware: counts successful GETs of declared routes, adds the count header.

Pure ASGI. The decision is taken when the app sends ``http.response.start``: by then the status is
known (only successes count) and inner middleware has set ``scope["user"]``. The start message gets
the count header; body messages pass through untouched, so streaming responses stay streaming.
A handler can decide its view earlier with ``track(request)`` (:mod:`viewmw.handlers`).
Whatever goes wrong inside viewmw, the app's own response goes out, without the header.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from viewmw.assembly import BuiltTracker
from viewmw.contract import RequestTracker, TrackResult
from viewmw.errorlog import ErrorLog
from viewmw.errors import ConfigurationError, InvalidKeyError
from viewmw.handlers import SCOPE_KEY, RequestView
from viewmw.identity import ViewerFunction, ViewerIdentity, is_crawler, read_signals
from viewmw.keys import validate_content_id
from viewmw.metrics.recording import recorder
from viewmw.routes import RouteMatch, RouteSpec, RouteTable
from viewmw.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Column

logger = logging.getLogger("viewmw")

_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_BOT = b"0; reason=bot"


class ViewTrackingMiddleware:
    """Counts views of the routes in ``routes`` and reports the count in a response header.

    Args:
        app: the ASGI app to wrap.
        tracker: what records views: a :class:`~viewmw.ViewTracker`, or a
            :class:`~viewmw.outage.failover.ResilientTracker` that keeps counting through Redis
            outages. ``None`` builds the resilient one from ``settings``; the middleware then owns
            its Redis and database clients, creates its tables at lifespan start-up and closes
            everything at lifespan shutdown (or on :meth:`startup` / :meth:`aclose`).
        routes: pattern -> content type, or pattern -> ``(content type, id parameter)``, in
            Starlette path syntax (``{"/stories/{id:int}": "story"}``), or a :class:`RouteTable`.
        settings: secret, time zone and Redis timeout; defaults to the tracker's settings, or to
            :meth:`Settings.from_env` when the middleware builds the tracker.
        count_header: response header carrying the combined count.
        debug_header: if set, a header saying whether this request was counted and, if not, why
            (``1``, ``0; reason=cooldown``, ``0; reason=bot``…). Off by default.
        count_statuses: response statuses that count a view (2xx by default).
        viewer: returns the user id for a scope (or an awaitable of it), ``None`` for anonymous;
            replaces the ``scope["user"]`` lookup.
        respect_privacy_signals: do not count requests sending ``DNT: 1`` or ``Sec-GPC: 1`` (their
            count is still shown).
        content_tables: for a tracker built here: content type -> count column of its own table
            (default: ``settings.content_tables``).
        create_tables: for a tracker built here: create viewmw's tables (and ``content_tables``)
            if missing, at lifespan start-up or :meth:`startup`.
        deferred: answer without waiting for Redis. The view leaves with the next batch (at the
            end of the current event-loop turn) and is decided as always; the header shows the
            latest count this process knows for the content (see docs/middleware.md), and the
            debug header says ``0; reason=deferred``. A content this process has not seen yet
            is answered the default way once. Off by default.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracker: RequestTracker | None = None,
        routes: Mapping[str, RouteSpec] | RouteTable,
        settings: Settings | None = None,
        count_header: str = "X-View-Count",
        debug_header: str | None = None,
        count_statuses: Container[int] = range(200, 300),
        viewer: ViewerFunction | None = None,
        respect_privacy_signals: bool = False,
        content_tables: Mapping[str, Column[Any]] | None = None,
        create_tables: bool = True,
        deferred: bool = False,
    ) -> None:
        self.app = app
        self.routes = RouteTable.coerce(routes)
        self._count_header = _header_name("count_header", count_header)
        self._debug_header = (
            None if debug_header is None else _header_name("debug_header", debug_header)
        )
        # The tracker built here, whose clients this middleware owns (None for one passed in).
        self._built: BuiltTracker | None = None
        if tracker is None:
            settings = settings or Settings.from_env()
            self._built = BuiltTracker(settings, content_tables, create_tables=create_tables)
            tracker = self._built.tracker
        self.tracker: RequestTracker = tracker
        self.settings = settings or tracker.settings
        self.identity = ViewerIdentity(
            self.settings.secret,
            self.settings.zone,
            viewer=viewer,
            clock=tracker.clock,
            viewer_timeout=self.settings.redis_timeout,
        )
        self.count_statuses = count_statuses
        self.respect_privacy_signals = respect_privacy_signals
        self.deferred = deferred
        self.errors = ErrorLog()
        self.metrics = recorder()
        self._untracked = RequestView.untracked(self)
        is_crawler("Mozilla/5.0")  # compile crawlerdetect's patterns now, not on a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._built is not None:
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        match = self._match(scope) if scope.get("method") == "GET" else None
        if match is None:
            scope[SCOPE_KEY] = self._untracked  # track(request) says so; counts can be read
            await self.app(scope, receive, send)
            return
        # Decided once, by track(request) in the handler or at the response start below.
        view = RequestView(self, match)
        scope[SCOPE_KEY] = scope.setdefault("state", {})[SCOPE_KEY] = view
        started = False

        async def send_with_count(message: Message) -> None:
            nonlocal started
            if started or message["type"] != "http.response.start":
                await send(message)
                return
            started = True
            # The decision, inline (one coroutine less per request); never raises but
            # CancelledError: whatever goes wrong, the app's own start message goes out.
            try:
                # A view track(request) offered already keeps its outcome, whatever the status.
                count, debug = await view.decide(
                    scope, counts=message.get("status") in self.count_statuses
                )
                message = self._with_headers(message, count, debug)
            except Exception as exc:
                self.errors.report(exc)
            await send(message)

        await self.app(scope, receive, send_with_count)

    def _match(self, scope: Scope) -> RouteMatch | None:
        try:
            return self.routes.match(scope)
        except Exception as exc:  # a malformed scope must not break the app
            self.errors.report(exc)
            return None

    def _with_headers(self, message: Message, count: int | None, debug: bytes) -> Message:
        """The start message with the count (and debug) headers added."""
        if count is None:
            if self._debug_header is None:
                return message
            extra = [(self._debug_header, debug)]
        elif self._debug_header is None:
            extra = [(self._count_header, b"%d" % count)]
        else:
            extra = [(self._count_header, b"%d" % count), (self._debug_header, debug)]
        # A new message and list: the app may reuse its own (a module-level Response).
        return {**message, "headers": [*message.get("headers", ()), *extra]}

    async def _outcome(
        self, scope: Scope, match: RouteMatch, *, wait: bool = False
    ) -> tuple[int | None, bytes]:
        """The count to show and the debug header's value for one matched request (``wait``:
        wait for Redis even in the deferred mode).

        The tracker bounds its own waits (``redis_timeout``, ``database_request_timeout``), so
        the request path holds no timeout of its own: one deadline per Redis batch is enough.
        """
        try:
            content_id = validate_content_id(match.content_id)
        except InvalidKeyError:
            # Client input, not a failure: a crafted URL must not be able to fill the error log.
            logger.debug("not tracking %s: id is not a valid key", match.pattern)
            return None, b"0; reason=invalid_id"
        user_agent, skip = self._signals(scope)
        try:
            if skip is _BOT:
                # Counted apart, per day, in the same round trip as the count read.
                crawler = await self.tracker.track_valid_crawler_view(
                    match.content_type, content_id
                )
                return _total(crawler.count), skip
            if skip is not None:
                counts = await self.tracker.get_view_count_details(match.content_type, [content_id])
                return _total(counts.get(content_id)), skip
            identity = self.identity
            viewer = (
                await identity.viewer_for(scope, user_agent)
                if identity.has_viewer_function
                else identity.default_viewer(scope, user_agent)  # nothing to await
            )
            if self.deferred and not wait:
                known = self.tracker.offer_valid_view(match.content_type, content_id, viewer)
                if known is not None:
                    return known, b"0; reason=deferred"
                # Not offered (a content not seen yet, a backlog, an outage): the default way.
            result = await self.tracker.track_valid_view(match.content_type, content_id, viewer)
        except InvalidKeyError:
            # The id is a valid key but its table cannot hold it (too large, not a UUID, …).
            return None, b"0; reason=invalid_id"
        except TimeoutError:
            # Late, or a slow viewer= callable: the view may have been recorded. Unknown, not
            # an error.
            return None, b"0; reason=unavailable"
        except Exception as exc:
            self.errors.report(exc)
            return None, b"0; reason=error"
        return _total(result.count), _debug_value(result)

    def _signals(self, scope: Scope) -> tuple[bytes, bytes | None]:
        """The user agent, and why this request is not offered as a view (``None``: it is)."""
        user_agent, prefetch, privacy_opt_out = read_signals(scope)
        if prefetch:
            return user_agent, b"0; reason=prefetch"
        if is_crawler(user_agent):
            return user_agent, _BOT
        if self.respect_privacy_signals and privacy_opt_out:
            return user_agent, b"0; reason=privacy"
        return user_agent, None

    # Owned clients ------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_and_start() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            return message

        async def send_and_close(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.aclose()
                except Exception:  # the server must still hear that shutdown finished
                    logger.exception("viewmw: closing the view tracking clients failed")
            await send(message)

        await self.app(scope, receive_and_start, send_and_close)

    async def startup(self) -> None:
        """Start a tracker this middleware built (see :meth:`viewmw.assembly.BuiltTracker.startup`):
        its tables (if ``create_tables``), its content table mapping, the outbox replay.

        Runs at lifespan start-up; a no-op for a tracker passed in. A database that cannot be
        reached is logged, not raised: the app starts anyway and serves its pages without counts.
        """
        if self._built is not None:
            await self._built.startup()

    async def aclose(self) -> None:
        """Write the outbox events still in memory and close the clients this middleware built.

        A no-op for a tracker passed in: its owner closes it.
        """
        if self._built is not None:
            await self._built.aclose()


def _debug_value(result: TrackResult) -> bytes:
    if result.counted:
        return b"1"
    if result.queued:
        return b"1; queued"  # durably in the outage outbox; the rules decide it at replay
    if result.reason is None:
        # The outcome is unknown (Redis' reply came too late, or Redis failed mid-call): the
        # script Redis runs decides that view, no other path does.
        return b"0; reason=unavailable"
    return b"0; reason=" + result.reason.encode("ascii")


def _total(count: object) -> int | None:
    total = getattr(count, "total", None)
    # Garbage from Redis must never reach a header: a plain int only (not a bool).
    return total if type(total) is int else None


def _header_name(setting: str, name: str) -> bytes:
    lowered = name.lower() if isinstance(name, str) else ""
    if not lowered or not set(lowered) <= _HEADER_NAME_CHARS:
        raise ConfigurationError(setting, f"must be an HTTP header name, got {name!r}")
    return lowered.encode("ascii")
