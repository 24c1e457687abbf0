"""The app never fails because of viewmw: Redis down, hanging, killed, or answering garbage."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import Message

from tests.asgi_support import (
    USER_AGENT,
    RedisProcess,
    StubRedis,
    drive,
    free_port,
    header,
    http_scope,
    plain_app,
)
from tests.support import FakeClock
from viewmw import (
    InvalidKeyError,
    MalformedReplyError,
    Outbox,
    ResilientTracker,
    Settings,
    Store,
    ViewTracker,
)
from viewmw.assembly import connect_redis
from viewmw.errorlog import ErrorLog, error_kind
from viewmw.middleware import ViewTrackingMiddleware

ROUTES = {"/stories/{id:int}": "story"}
REQUEST_HEADERS = [(b"user-agent", USER_AGENT.encode())]
APP_BODY = b"the app's own page"


def request(n: int = 1) -> dict[str, Any]:
    return http_scope(f"/stories/{n}", headers=REQUEST_HEADERS)


def middleware_on(tracker: ViewTracker, status: int = 200) -> ViewTrackingMiddleware:
    return ViewTrackingMiddleware(
        plain_app(status=status, body=APP_BODY),
        tracker=tracker,
        routes=ROUTES,
        debug_header="X-View-Counted",
    )


def assert_app_response(sent: list[Message], status: int = 200) -> None:
    """The app's status and body went out, without a count."""
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == status
    assert sent[1]["body"] == APP_BODY
    assert header(sent[0], b"content-type") == b"text/plain"
    assert header(sent[0], b"x-view-count") is None


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "viewmw_error", "") for r in caplog.records if r.levelno == logging.ERROR]


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return settings.replace(redis_timeout=0.05)


@pytest.fixture
async def owned_clients() -> AsyncIterator[list[aioredis.Redis]]:
    clients: list[aioredis.Redis] = []
    yield clients
    for client in clients:
        await client.aclose()


def tracker_for(
    url: str, settings: Settings, clients: list[aioredis.Redis], *, plain: bool = False
) -> ViewTracker:
    # plain=True: a client without socket timeouts, as a user might pass in; only the
    # middleware's own asyncio.timeout bounds the wait then.
    client = (
        aioredis.Redis.from_url(url) if plain else connect_redis(settings.replace(redis_url=url))
    )
    clients.append(client)
    return ViewTracker(client, None, settings, clock=FakeClock())


async def test_redis_unreachable(
    fast_settings: Settings,
    owned_clients: list[aioredis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    middleware = middleware_on(tracker_for(url, fast_settings, owned_clients))
    with caplog.at_level(logging.ERROR, logger="viewmw"):
        for n in range(5):
            sent = await drive(middleware, request(n))
            assert_app_response(sent)
            assert header(sent[0], b"x-view-counted") == b"0; reason=error"
    # Five failures, one log line: the rest are counted for the next report.
    assert failures(caplog) == ["redis"]


@pytest.mark.parametrize("plain_client", [False, True], ids=["built-client", "user-client"])
async def test_hanging_redis_takes_the_timeout_path(
    plain_client: bool,
    fast_settings: Settings,
    owned_clients: list[aioredis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with StubRedis(reply=None) as hanging:
        tracker = tracker_for(hanging.url, fast_settings, owned_clients, plain=plain_client)
        middleware = middleware_on(tracker)
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            for n in range(3):
                sent = await drive(middleware, request(n))
                assert_app_response(sent)
                # Late is not failed: the outcome is unknown, the script in Redis decides it.
                assert header(sent[0], b"x-view-counted") == b"0; reason=unavailable"
        assert hanging.commands >= 1  # the request did reach the hanging server
    assert failures(caplog) == []


@pytest.mark.parametrize(
    "reply",
    [
        b":42\r\n",
        b"*1\r\n$-1\r\n",
        b"-ERR boom\r\n",
        b"-NOSCRIPT No matching script\r\n",
        b"$3\r\nabc\r\n",
        b"*7\r\n:1\r\n:0\r\n+x\r\n:0\r\n:0\r\n:0\r\n+\r\n",
        b"?not resp at all\r\n",
        b"+garbage\r\n",
    ],
)
async def test_redis_answering_garbage(
    reply: bytes,
    settings: Settings,
    owned_clients: list[aioredis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The fixture's generous deadline: a late reply on a busy machine is not what this is about.
    async with StubRedis(reply=reply) as liar:
        middleware = middleware_on(tracker_for(liar.url, settings, owned_clients))
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            sent = await drive(middleware, request())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (sent[0]["status"], sent[1]["body"]) == (200, APP_BODY)
    count = header(sent[0], b"x-view-count")
    # Garbage can parse as numbers; whatever gets through is a number, never the garbage itself.
    assert count is None or count.isdigit()
    if count is None:
        assert len(failures(caplog)) == 1


async def test_redis_killed_mid_test_and_back(
    tmp_path: Any,
    settings: Settings,
    owned_clients: list[aioredis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisProcess(free_port())
    server.start()
    try:
        tracker = tracker_for(server.url, settings, owned_clients)
        middleware = middleware_on(tracker)
        counted = await drive(middleware, request(1))
        assert header(counted[0], b"x-view-count") == b"1"

        server.kill()
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            for n in range(2, 6):
                assert_app_response(await drive(middleware, request(n)))
        assert failures(caplog) in (["redis"], ["timeout"], ["redis", "timeout"])

        # A fresh server on the same port: the pool reconnects, the script is loaded again.
        server.start()
        again = await drive(middleware, request(7))
        assert header(again[0], b"x-view-count") == b"1"
        assert header(again[0], b"x-view-counted") == b"1"
    finally:
        server.kill()


async def test_database_down_still_counts_without_a_header(
    real_redis: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = Store.from_url(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    tracker = ViewTracker(real_redis, dead, settings, clock=FakeClock())
    try:
        with caplog.at_level(logging.ERROR, logger="viewmw"):
            sent = await drive(middleware_on(tracker), request())
    finally:
        await dead.close()
    assert_app_response(sent)
    # The view itself reached Redis; only the database part of the count was missing.
    assert header(sent[0], b"x-view-counted") == b"1"
    assert await real_redis.get("story:views:1") == b"1"


class BrokenTracker(ViewTracker):
    """A tracker whose every call fails the way a bug would."""

    async def track_valid_view(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the tracker")


async def test_unexpected_errors_are_logged_with_traceback(
    real_redis: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    middleware = middleware_on(BrokenTracker(real_redis, None, settings))
    with caplog.at_level(logging.ERROR, logger="viewmw"):
        assert_app_response(await drive(middleware, request()))
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.viewmw_error == "unexpected"  # type: ignore[attr-defined]
    assert record.exc_info is not None and "bug in the tracker" in str(record.exc_info[1])


async def test_app_errors_are_not_swallowed(real_redis: aioredis.Redis, settings: Settings) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("the app's own bug")

    middleware = ViewTrackingMiddleware(
        failing, tracker=ViewTracker(real_redis, None, settings), routes=ROUTES
    )
    with pytest.raises(ValueError, match="the app's own bug"):
        await drive(middleware, request())


async def test_non_success_status_does_not_touch_redis(
    fast_settings: Settings, owned_clients: list[aioredis.Redis]
) -> None:
    async with StubRedis(reply=None) as hanging:
        tracker = tracker_for(hanging.url, fast_settings, owned_clients)
        assert_app_response(await drive(middleware_on(tracker, status=404), request()), 404)
        assert hanging.commands == 0


def test_error_log_is_rate_limited_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(now=1000.0)
    log = ErrorLog(interval=60.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="viewmw"):
        for _ in range(10):
            log.report(RedisConnectionError("down"))
        log.report(TimeoutError())
        clock.advance(59)
        log.report(RedisConnectionError("down"))
        clock.advance(2)
        log.report(RedisConnectionError("still down"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "redis" in lines[0] and "more" not in lines[0]
    assert "timeout" in lines[1]
    assert "still down" in lines[2] and "10 more redis failures" in lines[2]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (RedisTimeoutError(), "redis"),
        (RedisConnectionError(), "redis"),
        (ConnectionResetError(), "redis"),
        (MalformedReplyError("?"), "redis"),
        (InvalidKeyError("?"), "invalid_key"),
        (ValueError(), "unexpected"),
    ],
)
def test_error_kinds(exc: BaseException, kind: str) -> None:
    assert error_kind(exc) == kind


async def test_built_tracker_queues_views_in_the_outbox_while_redis_is_down(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url=f"sqlite:///{tmp_path}/outbox.sqlite3",
        secret="outbox-secret-0123456789",
        redis_timeout=0.05,
        database_request_timeout=5.0,
    )
    middleware = ViewTrackingMiddleware(
        plain_app(body=APP_BODY), routes=ROUTES, settings=settings, debug_header="X-View-Counted"
    )
    await middleware.startup()
    shown: list[tuple[bytes | None, bytes | None]] = []
    try:
        with caplog.at_level(logging.WARNING, logger="viewmw"):
            for n in range(6):  # six different visitors of one story
                agent = USER_AGENT.encode() + str(n).encode()
                sent = await drive(
                    middleware, http_scope("/stories/1", headers=[(b"user-agent", agent)])
                )
                assert (sent[0]["status"], sent[1]["body"]) == (200, APP_BODY)
                shown.append((header(sent[0], b"x-view-counted"), header(sent[0], b"x-view-count")))
    finally:
        await middleware.aclose()
    # A refused connection proves the call was never sent: every view is kept in the outbox
    # and shown at once, before the breaker opens (after three) as after.
    assert shown == [(b"1; queued", str(n).encode()) for n in range(1, 7)]
    assert any("database outbox" in r.getMessage() for r in caplog.records)
    built = middleware.tracker
    assert isinstance(built, ResilientTracker) and built.breaker.opened_count == 1
    store = Store.from_url(settings.database_url)
    try:
        assert await Outbox(store.engine).counts("story", ["1"]) == {"1": 6}
        assert await store.read_count("story", "1") == 0  # counted only when replayed
    finally:
        await store.close()
