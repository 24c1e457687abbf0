"""Viewer keys, the daily salt, crawler and prefetch checks."""

from __future__ import annotations

import base64
import hmac
import logging
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.authentication import SimpleUser, UnauthenticatedUser
from starlette.types import Scope

from tests.support import NOON_UTC, FakeClock
from viewmw import identity
from viewmw.identity import (
    ANONYMOUS_HASH_CHARS,
    RequestSignals,
    ViewerIdentity,
    authenticated_id,
    is_crawler,
)
from viewmw.keys import validate_viewer

SECRET = "test-secret-0123456789"
CHROME = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0"


def scope(**extra: Any) -> dict[str, Any]:
    return {"type": "http", "client": ("203.0.113.9", 5000), "headers": [], **extra}


class IdUser:
    """A user object with an ``id`` but no Starlette ``identity``."""

    is_authenticated = True

    def __init__(self, user_id: object) -> None:
        self.id = user_id


async def test_authenticated_starlette_user() -> None:
    viewers = ViewerIdentity(SECRET)
    # A username may be personal data: it is hashed. Opaque ids (numbers, UUIDs) stay as they are.
    alice = await viewers.viewer_for(scope(user=SimpleUser("alice")), CHROME)
    assert alice == viewers.user_viewer("alice") and "alice" not in alice
    assert await viewers.viewer_for(scope(user=IdUser(42)), CHROME) == "user:42"
    uuid = "0b5f7a2e-8c1d-4e3f-9a6b-1c2d3e4f5a6b"
    assert await viewers.viewer_for(scope(user=IdUser(uuid)), CHROME) == f"user:{uuid}"


async def test_unauthenticated_user_is_anonymous() -> None:
    viewers = ViewerIdentity(SECRET)
    viewer = await viewers.viewer_for(scope(user=UnauthenticatedUser()), CHROME)
    assert viewer.startswith("anon:")
    assert authenticated_id(scope(user=SimpleUser(""))) is None
    assert authenticated_id(scope()) is None


@pytest.mark.parametrize("user_id", ["alice@example.com", "Zoë", "a" * 65, "x y", b"raw-bytes"])
def test_unsafe_user_ids_are_hashed(user_id: object) -> None:
    viewer = ViewerIdentity(SECRET).user_viewer(user_id)
    assert viewer is not None
    assert validate_viewer(viewer) == viewer
    text = user_id.decode() if isinstance(user_id, bytes) else str(user_id)
    assert text not in viewer
    assert ViewerIdentity(SECRET).user_viewer(user_id) == viewer  # stable for the same secret
    assert ViewerIdentity(SECRET + "-other").user_viewer(user_id) != viewer


def test_empty_user_id_is_no_user() -> None:
    assert ViewerIdentity(SECRET).user_viewer(b"") is None


async def test_viewer_callable_sync_and_async() -> None:
    def by_header(s: Scope) -> object:
        return dict(s["headers"]).get(b"x-user", b"").decode() or None

    async def async_by_header(s: Scope) -> object:
        return by_header(s)

    for function in (by_header, async_by_header):
        viewers = ViewerIdentity(SECRET, viewer=function)
        # The callable replaces scope["user"].
        request = scope(headers=[(b"x-user", b"7")], user=SimpleUser("alice"))
        assert await viewers.viewer_for(request, CHROME) == "user:7"
        assert (await viewers.viewer_for(scope(user=SimpleUser("alice")), CHROME)).startswith(
            "anon:"
        )


def test_anonymous_key_shape_and_inputs() -> None:
    viewers = ViewerIdentity(SECRET, clock=FakeClock())
    viewer = viewers.anonymous_viewer("203.0.113.9", CHROME)
    assert re.fullmatch(rf"anon:[A-Za-z0-9_-]{{{ANONYMOUS_HASH_CHARS}}}", viewer)
    assert viewers.anonymous_viewer("203.0.113.9", CHROME) == viewer
    assert viewers.anonymous_viewer("203.0.113.10", CHROME) != viewer
    assert viewers.anonymous_viewer("203.0.113.9", CHROME + b" Edg/1") != viewer
    other_secret = ViewerIdentity(SECRET + "-other", clock=FakeClock())
    assert other_secret.anonymous_viewer("203.0.113.9", CHROME) != viewer
    # Address and user agent are separated, so they cannot be shifted into each other.
    assert viewers.anonymous_viewer("1.2.3.4", b"5x") != viewers.anonymous_viewer("1.2.3.45", b"x")


def test_anonymous_key_rotates_at_midnight_in_the_settings_zone() -> None:
    clock = FakeClock(NOON_UTC)  # 12:00 UTC is 21:00 in Tokyo
    tokyo = ViewerIdentity(SECRET, "Asia/Tokyo", clock=clock)
    utc = ViewerIdentity(SECRET, "UTC", clock=clock)
    tokyo_noon, utc_noon = tokyo.anonymous_viewer("h", CHROME), utc.anonymous_viewer("h", CHROME)
    clock.advance(3 * 3600)  # 15:00 UTC: still the same day in UTC, the next day in Tokyo
    assert utc.anonymous_viewer("h", CHROME) == utc_noon
    assert tokyo.anonymous_viewer("h", CHROME) != tokyo_noon
    clock.advance(9 * 3600)  # 00:00 UTC
    assert utc.anonymous_viewer("h", CHROME) != utc_noon


async def test_anonymous_without_client_and_with_non_utf8_agent() -> None:
    viewers = ViewerIdentity(SECRET)
    viewer = await viewers.viewer_for({"type": "http", "headers": []}, b"\xff\xfe\x80 agent")
    assert validate_viewer(viewer) == viewer


def test_missing_secret_uses_a_random_one_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    identity._process_secret.cache_clear()
    with caplog.at_level(logging.WARNING, logger="viewmw"):
        first = ViewerIdentity(None).anonymous_viewer("h", CHROME)
        second = ViewerIdentity(None).anonymous_viewer("h", CHROME)
    assert first == second  # one secret per process
    assert first != ViewerIdentity(SECRET).anonymous_viewer("h", CHROME)
    warnings = [r for r in caplog.records if "no secret configured" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("user_agent", "crawler"),
    [
        (b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", True),
        (b"Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", True),
        (b"curl/8.5.0", True),
        (b"python-httpx/0.28.1", True),
        (b"", True),
        (b"   ", True),
        (CHROME, False),
        (CHROME.decode(), False),
    ],
)
def test_crawlers(user_agent: bytes | str, crawler: bool) -> None:
    assert is_crawler(user_agent) is crawler


def test_crawler_check_is_cached_and_bounded() -> None:
    identity._is_crawler_header.cache_clear()
    identity._is_crawler_text.cache_clear()
    for _ in range(5):
        assert is_crawler(CHROME) is False
    info = identity._is_crawler_header.cache_info()
    assert (info.misses, info.hits, info.maxsize) == (1, 4, 4096)
    assert identity._is_crawler_text.cache_info().misses == 1  # crawlerdetect ran once
    # A huge user agent is checked by its head only (the whole would take crawlerdetect minutes),
    # and cached under it: the cache holds at most 4096 short strings.
    huge = b"Mozilla/5.0 " + b"a" * 100_000
    assert is_crawler(huge) is False
    assert is_crawler(huge[: identity.CRAWLER_CHECK_CHARS]) is False
    info = identity._is_crawler_header.cache_info()
    assert (info.misses, info.hits) == (2, 5)
    # Text and raw headers share crawlerdetect's verdicts.
    assert is_crawler(CHROME.decode()) is False
    assert identity._is_crawler_text.cache_info().misses == 2


@pytest.mark.parametrize(
    ("headers", "prefetch", "opt_out"),
    [
        ([(b"sec-purpose", b"prefetch")], True, False),
        ([(b"sec-purpose", b"prefetch;prerender")], True, False),
        ([(b"Sec-Purpose", b"Prefetch;anonymous-client-ip")], True, False),
        ([(b"purpose", b"prefetch")], True, False),
        ([(b"x-moz", b"prefetch")], True, False),
        ([(b"x-purpose", b"preview")], True, False),
        ([(b"sec-purpose", b"other")], False, False),
        ([(b"dnt", b"1")], False, True),
        ([(b"sec-gpc", b" 1 ")], False, True),
        ([(b"dnt", b"0")], False, False),
        ([], False, False),
    ],
)
def test_request_signals(headers: list[tuple[bytes, bytes]], prefetch: bool, opt_out: bool) -> None:
    signals = RequestSignals.from_scope({"headers": [(b"user-agent", b"UA"), *headers]})
    assert (signals.user_agent, signals.prefetch, signals.privacy_opt_out) == (
        b"UA",
        prefetch,
        opt_out,
    )


def test_first_user_agent_wins_and_missing_is_empty() -> None:
    two = [(b"user-agent", b"first"), (b"user-agent", b"second")]
    assert RequestSignals.from_scope({"headers": two}).user_agent == b"first"
    assert RequestSignals.from_scope({}).user_agent == b""


@given(host=st.text(max_size=40), user_agent=st.binary(max_size=300))
def test_anonymous_keys_are_the_documented_keyed_hash(host: str, user_agent: bytes) -> None:
    """The key is the first 16 characters of the URL-safe base64 HMAC-SHA256 of
    ``host\\nuser agent`` under ``secret\\0date``: keys must not change between versions, or a
    deploy would reset every visitor's limits mid-day."""
    viewers = ViewerIdentity(SECRET, clock=FakeClock(now=NOON_UTC))
    day = datetime.fromtimestamp(NOON_UTC, UTC).date().isoformat()
    key = f"{SECRET}\0{day}".encode()
    message = host.encode("utf-8", "surrogatepass") + b"\n" + user_agent
    digest = hmac.digest(key, message, "sha256")
    expected = "anon:" + base64.urlsafe_b64encode(digest).decode()[:16]
    assert viewers.anonymous_viewer(host, user_agent) == expected


@given(secret=st.text(min_size=1, max_size=120), user_agent=st.binary(max_size=80))
def test_anonymous_keys_match_hmac_for_any_secret_length(secret: str, user_agent: bytes) -> None:
    """The precomputed HMAC pads give the standard HMAC for secrets shorter and longer than
    SHA-256's block (a longer key is hashed first)."""
    viewers = ViewerIdentity(secret, clock=FakeClock(now=NOON_UTC))
    day = datetime.fromtimestamp(NOON_UTC, UTC).date().isoformat()
    key = secret.encode() + b"\0" + day.encode()
    digest = hmac.digest(key, b"h\n" + user_agent, "sha256")
    expected = "anon:" + base64.urlsafe_b64encode(digest).decode()[:16]
    assert viewers.anonymous_viewer("h", user_agent) == expected
