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
from typing import Any, Protocol, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Column
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from viewmw.errorlog import ErrorLog
from viewmw.errors import ConfigurationError, InvalidKeyError
from viewmw.identity import RequestSignals, ViewerFunction, ViewerIdentity, is_crawler
from viewmw.keys import validate_content_id
from viewmw.mapping import record_mapping
from viewmw.outage.failover import ResilientTracker
from viewmw.outage.outbox import Outbox
from viewmw.packing import connection_class_for
from viewmw.routes import RouteMatch, RouteSpec, RouteTable
from viewmw.settings import Settings
from viewmw.store import Store
from viewmw.tracker import TrackResult, ViewCount, ViewTracker

logger = logging.getLogger("viewmw")

_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
REDIS_MAX_CONNECTIONS = 100
_BOT = b"0; reason=bot"


class RequestTracker(Protocol):
    """What the middleware needs of a tracker: :class:`~viewmw.ViewTracker` and
    :class:`~viewmw.outage.failover.ResilientTracker` both provide it."""

    @property
    def settings(self) -> Settings:
        """Limits, time zone, timeouts."""
        ...

    @property
    def clock(self) -> Callable[[], float]:
        """Seconds since the epoch (tests inject one); the viewer keys follow its calendar day."""
        ...

    async def track_valid_view(
        self, content_type: str, content_id: str, viewer: str
    ) -> TrackResult:
        """Offer one view (names already validated) to the abuse rules."""
        ...

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        """Offer one view without waiting; the latest known count (deferred mode)."""
        ...

    async def track_valid_crawler_view(self, content_type: str, content_id: str) -> TrackResult:
        """Count a crawler view apart (never in the view count) and read the count."""
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
        self._built: ResilientTracker | None = None
        if tracker is None:
            settings = settings or Settings.from_env()
            owned = build_tracker(settings, content_tables)
            assert owned.store is not None
            tracker = self._built = ResilientTracker(owned, Outbox(owned.store.engine))
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
        self.create_tables = create_tables
        self.deferred = deferred
        self.errors = ErrorLog()
        self._closed = False
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
                count, debug = await self._outcome(scope, match)
            else:
                count, debug = None, b"0; reason=status"
            extra: list[tuple[bytes, bytes]] = []
            if count is not None:
                extra.append((self._count_header, b"%d" % count))
            if self._debug_header is not None:
                extra.append((self._debug_header, debug))
            if not extra:
                return message
            # A new message and list: the app may reuse its own (a module-level Response).
            return {**message, "headers": [*message.get("headers", ()), *extra]}
        except Exception as exc:
            self.errors.report(exc)
            return message

    async def _outcome(self, scope: Scope, match: RouteMatch) -> tuple[int | None, bytes]:
        """The count to show and the debug header's value for one matched request.

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
            viewer = await self.identity.viewer_for(scope, user_agent)
            if self.deferred:
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
        signals = RequestSignals.from_scope(scope)
        if signals.prefetch:
            return signals.user_agent, b"0; reason=prefetch"
        if is_crawler(signals.user_agent):
            return signals.user_agent, _BOT
        if self.respect_privacy_signals and signals.privacy_opt_out:
            return signals.user_agent, b"0; reason=privacy"
        return signals.user_agent, None

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
        """Create the tables of a store this middleware built (if ``create_tables``), record
        its content table mapping in Redis for the sync to check (:mod:`viewmw.mapping`), and
        start replaying views an earlier run left in the outage outbox.

        Runs at lifespan start-up. A database that cannot be reached is logged, not raised: the
        app starts anyway and serves its pages without counts.
        """
        if self._built is None:
            return
        owned = self._built.tracker
        if owned.store is not None:  # where the sync must move counts
            await record_mapping(owned.redis, owned.keys, owned.store)
        if self.create_tables and owned.store is not None:
            try:
                async with asyncio.timeout(self.settings.database_timeout):
                    await owned.store.create_tables()
            except Exception:
                logger.exception("viewmw: creating the view count tables failed")
        await self._built.startup()

    async def aclose(self) -> None:
        """Write the outbox events still in memory and close the clients this middleware built.

        A no-op for a tracker passed in: its owner closes it.
        """
        built = self._built
        if built is None or self._closed:
            return
        self._closed = True
        try:
            await built.aclose()
        finally:
            await built.tracker.redis.aclose()
            if built.tracker.store is not None:
                await built.tracker.store.close()


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
    busy, and a failed command is never resent. The socket timeouts are ``redis_probe_timeout``,
    a backstop far above the request deadline: a request stops waiting at ``redis_timeout``, but
    the reply is still read, so a loop that was merely busy never breaks the connection. With no
    URL set: an in-process fakeredis, with a warning that its counts are neither shared nor kept.

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
        socket_timeout=settings.redis_probe_timeout,
        socket_connect_timeout=settings.redis_probe_timeout,
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
