"""ViewTrackingMiddleware: counts successful GETs of declared routes, adds the count header.

Pure ASGI. The decision is taken when the app sends ``http.response.start``: by then the status is
known (only successes count) and inner middleware has set ``scope["user"]``. The start message gets
the count header; body messages pass through untouched, so streaming responses stay streaming.
Whatever goes wrong inside viewmw, the app's own response goes out, without the header.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Column
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from viewmw.errorlog import ErrorLog
from viewmw.errors import ConfigurationError, InvalidKeyError
from viewmw.fallback import DatabaseFallback
from viewmw.identity import RequestSignals, ViewerFunction, ViewerIdentity, is_crawler
from viewmw.keys import validate_content_id
from viewmw.mapping import record_mapping
from viewmw.packing import connection_class_for
from viewmw.resilient import ResilientTracker
from viewmw.routes import RouteMatch, RouteSpec, RouteTable
from viewmw.settings import Settings
from viewmw.store import Store
from viewmw.tracker import TrackResult, ViewCount, ViewTracker

logger = logging.getLogger("viewmw")

_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
REDIS_MAX_CONNECTIONS = 100


class RequestTracker(Protocol):
    """What the middleware needs of a tracker: :class:`~viewmw.ViewTracker` and
    :class:`~viewmw.resilient.ResilientTracker` both provide it."""

    @property
    def settings(self) -> Settings:
        """Limits, time zone, timeouts."""
        ...

    async def track_view(
        self, content_type: str, content_id: str | int, viewer: str
    ) -> TrackResult:
        """Offer one view to the abuse rules."""
        ...

    async def get_view_count_details(
        self, content_type: str, content_ids: Sequence[str | int]
    ) -> dict[str, ViewCount | None]:
        """Read counts without counting."""
        ...


class ViewTrackingMiddleware:
    """Counts views of the routes in ``routes`` and reports the count in a response header.

    Args:
        app: the ASGI app to wrap.
        tracker: what records views: a :class:`~viewmw.ViewTracker`, or a
            :class:`~viewmw.resilient.ResilientTracker` that keeps counting through Redis
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
    ) -> None:
        self.app = app
        self.routes = RouteTable.coerce(routes)
        self._count_header = _header_name("count_header", count_header)
        self._debug_header = (
            None if debug_header is None else _header_name("debug_header", debug_header)
        )
        self._owned: ViewTracker | None = None
        if tracker is None:
            settings = settings or Settings.from_env()
            self._owned = build_tracker(settings, content_tables)
            assert self._owned.store is not None
            tracker = ResilientTracker(self._owned, DatabaseFallback(self._owned.store))
        self.tracker: RequestTracker = tracker
        self.settings = settings or tracker.settings
        inner = tracker.tracker if isinstance(tracker, ResilientTracker) else tracker
        clock = inner.clock if isinstance(inner, ViewTracker) else time.time
        self.identity = ViewerIdentity(
            self.settings.secret, self.settings.zone, viewer=viewer, clock=clock
        )
        # The tracker bounds its Redis calls by redis_timeout and its database reads by
        # database_timeout; this is the backstop for everything else (a slow viewer= callable).
        self.timeout = self.settings.redis_timeout + self.settings.database_timeout
        self.count_statuses = count_statuses
        self.respect_privacy_signals = respect_privacy_signals
        self.create_tables = create_tables
        self.errors = ErrorLog()
        self._closed = False
        is_crawler("Mozilla/5.0")  # compile crawlerdetect's patterns now, not on a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._owned is not None:
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        match = self._match(scope) if scope.get("method") == "GET" else None
        if match is None:
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_count(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                message = await self._decorate(scope, match, message)
            await send(message)

        await self.app(scope, receive, send_with_count)

    def _match(self, scope: Scope) -> RouteMatch | None:
        try:
            return self.routes.match(scope)
        except Exception as exc:  # a malformed scope must not break the app
            self.errors.report(exc)
            return None

    async def _decorate(self, scope: Scope, match: RouteMatch, message: Message) -> Message:
        """The start message with the count (and debug) headers added; never raises."""
        try:
            if message.get("status") in self.count_statuses:
                outcome = await self._outcome(scope, match)
            else:
                outcome = _Outcome(None, False, "status")
            extra: list[tuple[bytes, bytes]] = []
            if outcome.count is not None:
                extra.append((self._count_header, str(outcome.count).encode("ascii")))
            if self._debug_header is not None:
                extra.append((self._debug_header, outcome.debug_value()))
            if not extra:
                return message
            # A new message and list: the app may reuse its own (a module-level Response).
            return {**message, "headers": [*message.get("headers", ()), *extra]}
        except Exception as exc:
            self.errors.report(exc)
            return message

    async def _outcome(self, scope: Scope, match: RouteMatch) -> _Outcome:
        try:
            content_id = validate_content_id(match.content_id)
        except InvalidKeyError:
            # Client input, not a failure: a crafted URL must not be able to fill the error log.
            logger.debug("not tracking %s: id is not a valid key", match.pattern)
            return _Outcome(None, False, "invalid_id")
        signals = RequestSignals.from_scope(scope)
        if signals.prefetch:
            skip: str | None = "prefetch"
        elif is_crawler(signals.user_agent):
            skip = "bot"
        elif self.respect_privacy_signals and signals.privacy_opt_out:
            skip = "privacy"
        else:
            skip = None
        try:
            async with asyncio.timeout(self.timeout):
                if skip is not None:
                    counts = await self.tracker.get_view_count_details(
                        match.content_type, [content_id]
                    )
                    count = counts.get(content_id)
                    return _Outcome(_total(count), False, skip)
                viewer = await self.identity.viewer_for(scope, signals.user_agent)
                result = await self.tracker.track_view(match.content_type, content_id, viewer)
                reason = None if result.reason is None else str(result.reason)
                return _Outcome(_total(result.count), result.counted, reason)
        except Exception as exc:
            self.errors.report(exc)
            return _Outcome(None, False, "error")

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
        """Create the tables of a store this middleware built (if ``create_tables``), and record
        its content table mapping in Redis for the sync to check (:mod:`viewmw.mapping`).

        Runs at lifespan start-up. A database that cannot be reached is logged, not raised: the
        app starts anyway and serves its pages without counts.
        """
        store = None if self._owned is None else self._owned.store
        if self._owned is not None and store is not None:  # where the sync must move counts
            await record_mapping(self._owned.redis, self._owned.keys, store)
        if not (self.create_tables and store is not None):
            return
        try:
            async with asyncio.timeout(self.settings.database_timeout):
                await store.create_tables()
        except Exception:
            logger.exception("viewmw: creating the view count tables failed")

    async def aclose(self) -> None:
        """Write the fallback's buffered views and close the clients this middleware built.

        A no-op for a tracker passed in: its owner closes it.
        """
        owned = self._owned
        if owned is None or self._closed:
            return
        self._closed = True
        try:
            if isinstance(self.tracker, ResilientTracker):
                await self.tracker.aclose()
        finally:
            await owned.redis.aclose()
            if owned.store is not None:
                await owned.store.close()


@dataclass(frozen=True, slots=True)
class _Outcome:
    count: int | None
    counted: bool
    reason: str | None

    def debug_value(self) -> bytes:
        if self.counted:
            return b"1"
        # No reason: a resilient tracker answered without counting (Redis failed mid-call).
        return f"0; reason={self.reason or 'unavailable'}".encode("ascii")


def _total(count: object) -> int | None:
    total = getattr(count, "total", None)
    # Garbage from Redis must never reach a header.
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _header_name(setting: str, name: str) -> bytes:
    lowered = name.lower() if isinstance(name, str) else ""
    if not lowered or not set(lowered) <= _HEADER_NAME_CHARS:
        raise ConfigurationError(setting, f"must be an HTTP header name, got {name!r}")
    return lowered.encode("ascii")


# Building a tracker from settings ---------------------------------------------------------------


def build_tracker(
    settings: Settings,
    content_tables: Mapping[str, Column[Any]] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> ViewTracker:
    """A tracker on new clients for ``settings.redis_url`` and ``settings.database_url``.

    Content types map to ``content_tables`` if given, else to ``settings.content_tables``. Without
    a Redis URL it runs on an in-process fakeredis (see :func:`connect_redis`). The caller owns
    the clients: close them with ``tracker.redis.aclose()`` and ``tracker.store.close()``.
    """
    if content_tables is None:
        store = Store.from_settings(settings)
    else:
        store = Store.from_url(settings.resolved_database_url(), content_tables, pool_pre_ping=True)
    return ViewTracker(connect_redis(settings), store, settings, clock=clock)


def connect_redis(settings: Settings) -> Redis:
    """A Redis client for ``settings.redis_url`` sized for request paths.

    Requests wait for a free connection (up to ``redis_timeout``) instead of failing when all are
    busy, and a failed command is retried once at once (a pooled connection the server closed),
    never after a back-off sleep the request cannot afford. With no URL set: an in-process
    fakeredis, with a warning that its counts are neither shared nor kept.

    Raises:
        ConfigurationError: no URL is set and fakeredis is not installed.
    """
    if settings.redis_url is None:
        return _embedded_redis()
    packing = connection_class_for(settings.redis_url)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        **({"connection_class": packing} if packing else {}),
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        # Never resend: a script that timed out may have run, and a resent one counts again.
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


def _embedded_redis() -> Redis:
    if importlib.util.find_spec("fakeredis") is None or importlib.util.find_spec("lupa") is None:
        raise ConfigurationError(
            "VIEWMW_REDIS_URL",
            "is not set and the embedded stand-in is not installed: "
            "`pip install viewmw[embedded]`, or set VIEWMW_REDIS_URL=redis://host:6379/0",
        )
    import fakeredis

    logger.warning(
        "viewmw: VIEWMW_REDIS_URL is not set; counting views in an in-process fakeredis. "
        "Counts are not shared between processes, and views not yet synced are lost at exit."
    )
    return cast(Redis, fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
