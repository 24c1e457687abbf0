"""Whatever a client sends, the middleware never raises and the app's response goes out intact."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.authentication import SimpleUser, UnauthenticatedUser
from starlette.types import Message

from tests.asgi_support import assert_no_personal_data, drive, header, http_scope
from viewmw import ViewTracker
from viewmw.keys import validate_content_id
from viewmw.middleware import ViewTrackingMiddleware

ROUTES: dict[str, Any] = {
    "/s/{id}": "story",
    "/n/{id:int}": "fantasy",
    "/p/{id:path}": "task",
    "/u/{user}/o/{key}": ("outcome", "key"),
}
# Every generated user agent and address starts with a marker, so a scan of Redis can prove that
# none of them was stored.
UA_MARK = b"UA-MARK/"
HOST_MARK = "192.0.2."

EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

segments = st.one_of(
    st.text(min_size=0, max_size=80),
    st.text(alphabet="abcXYZ019-_", min_size=1, max_size=70),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["0" * 80, "9" * 5000, "..", "%2F", "\x00", "\udcff", "a/b", " "]),
)
route_prefixes = st.sampled_from(["/s/", "/n/", "/p/"])
paths = st.one_of(
    st.builds(lambda prefix, seg: prefix + seg, route_prefixes, segments),
    st.builds(lambda prefix, n: f"{prefix}{n}", route_prefixes, st.integers(0, 10**6)),
    st.builds(lambda u, k: f"/u/{u}/o/{k}", segments, segments),
    st.text(max_size=200),
)
header_values = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1, 20_000)),
)
header_names = st.one_of(
    st.sampled_from(
        [b"user-agent", b"User-Agent", b"sec-purpose", b"purpose", b"dnt", b"sec-gpc", b"x-moz"]
    ),
    st.binary(min_size=1, max_size=40),
)
user_agents = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3), st.integers(1, 50_000)),
    st.sampled_from([b"\xff\xfe\xfd", b"Mozilla/5.0 \x80\x81 Googlebot", b"Mozilla/5.0"]),
).map(lambda ua: UA_MARK + ua)
clients = st.one_of(
    st.none(),
    st.tuples(st.text(max_size=40).map(lambda h: HOST_MARK + h), st.integers(0, 65535)),
)


class StrangeUser:
    """Users as third-party auth libraries shape them, including ones that raise."""

    def __init__(self, authenticated: object, identity: object) -> None:
        self._authenticated = authenticated
        self._identity = identity

    @property
    def is_authenticated(self) -> object:
        if isinstance(self._authenticated, Exception):
            raise self._authenticated
        return self._authenticated

    @property
    def identity(self) -> object:
        if isinstance(self._identity, Exception):
            raise self._identity
        return self._identity


users = st.one_of(
    st.none(),
    st.just(UnauthenticatedUser()),
    st.builds(SimpleUser, st.text(max_size=100)),
    st.builds(
        StrangeUser,
        st.one_of(st.booleans(), st.just(RuntimeError("auth backend bug"))),
        st.one_of(
            st.none(),
            st.text(max_size=100),
            st.binary(max_size=100),
            st.integers(),
            st.floats(),
            st.just(NotImplementedError()),
            st.just(KeyError("no id")),
        ),
    ),
)


def app_for(status: int, chunks: list[bytes]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"x-app", b"1")]})
        for n, chunk in enumerate(chunks):
            await send(
                {"type": "http.response.body", "body": chunk, "more_body": n < len(chunks) - 1}
            )

    return app


def assert_intact(sent: list[Message], status: int, chunks: list[bytes], content_id: str) -> None:
    assert sent[0]["status"] == status
    assert header(sent[0], b"x-app") == b"1"
    assert [m["body"] for m in sent[1:]] == chunks
    count = header(sent[0], b"x-view-count")
    if count is not None:
        assert count.isdigit()
        validate_content_id(content_id)  # only a valid id can ever get a count


@EXAMPLES
@given(
    path=paths,
    root_path=st.one_of(st.just(""), st.sampled_from(["/s", "/blog"]), st.text(max_size=10)),
    method=st.sampled_from(["GET"] * 6 + ["HEAD", "POST", "get", "BREW"]),
    status=st.sampled_from([200, 204, 301, 404, 500]),
    chunks=st.lists(st.binary(max_size=50), min_size=1, max_size=3),
    user_agent=user_agents,
    extra_headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    client=clients,
    user=users,
)
async def test_any_request_gets_the_apps_response(
    tracker: ViewTracker,
    path: str,
    root_path: str,
    method: str,
    status: int,
    chunks: list[bytes],
    user_agent: bytes,
    extra_headers: list[tuple[bytes, bytes]],
    client: tuple[str, int] | None,
    user: object,
) -> None:
    middleware = ViewTrackingMiddleware(
        app_for(status, chunks), tracker=tracker, routes=ROUTES, debug_header="x-debug"
    )
    scope = http_scope(
        root_path + path,
        method=method,
        headers=[(b"user-agent", user_agent), *extra_headers],
        client=client,
        root_path=root_path,
    )
    if user is not None:
        scope["user"] = user
    sent = await drive(middleware, scope)
    found = middleware.routes.match(scope)
    assert_intact(sent, status, chunks, found.content_id if found else "")
    debug = header(sent[0], b"x-debug")
    event(f"x-debug: {debug.decode() if debug else None}")
    if method != "GET" or found is None:
        assert len(sent[0]["headers"]) == 1  # not ours to touch: exactly the app's header


@EXAMPLES
@given(content_id=segments, user_agent=user_agents, client=clients)
async def test_ids_and_viewers_never_leak_into_redis(
    tracker: ViewTracker, content_id: str, user_agent: bytes, client: tuple[str, int] | None
) -> None:
    middleware = ViewTrackingMiddleware(app_for(200, [b"ok"]), tracker=tracker, routes=ROUTES)
    scope = http_scope(f"/p/{content_id}", headers=[(b"user-agent", user_agent)], client=client)
    assert_intact(await drive(middleware, scope), 200, [b"ok"], content_id)
    await assert_no_personal_data(tracker.redis, [UA_MARK, HOST_MARK.encode()])


@pytest.mark.parametrize("size", [8 * 1024, 64 * 1024, 1024 * 1024])
async def test_huge_user_agent_is_cheap_and_harmless(tracker: ViewTracker, size: int) -> None:
    # crawlerdetect alone needs minutes for 64 kB of letters; the middleware checks only a head.
    middleware = ViewTrackingMiddleware(app_for(200, [b"ok"]), tracker=tracker, routes=ROUTES)
    user_agent = b"Mozilla/5.0 " + b"a" * size
    sent = await drive(middleware, http_scope("/s/1", headers=[(b"user-agent", user_agent)]))
    assert header(sent[0], b"x-view-count") == b"1"
