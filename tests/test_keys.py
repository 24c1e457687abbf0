"""The key schema and the validation every name passes before it becomes part of a Redis key.

Bad content types, ids and viewers are refused with :class:`InvalidKeyError` before Redis (or the
database) is touched: the tracker under test talks to a tripwire that records and fails any use.
"""

from __future__ import annotations

import asyncio
import fnmatch
import string
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import GENEROUS_DEADLINES, FakeClock
from viewmw import InvalidKeyError, KeySchema, Limits, Settings, ViewTracker
from viewmw.keys import validate_content_id, validate_content_type, validate_viewer

ID_ALPHABET = string.ascii_letters + string.digits + "-_"
TYPE_ALPHABET = string.ascii_lowercase + string.digits + "_"

# Characters that must never reach a key: glob and hash-tag syntax, separators, whitespace, and
# anything outside ASCII (look-alike digits and letters, invisible spaces, emoji).
NAMED_BAD_CHARS = [
    *"*?[]{}:/\\.,;@#%+=!$&'\"()<>|^`~",
    *" \t\n\r\x0b\x0c\x00",
    "é",
    "ß",
    "字",
    "١",  # ARABIC-INDIC DIGIT ONE: str.isdigit() is True
    "ｆ",  # FULLWIDTH LATIN SMALL LETTER F
    "\u00a0",
    "\u200b",
    "\u2028",
    "\U0001f600",
]
bad_chars = st.sampled_from(NAMED_BAD_CHARS) | st.characters().filter(
    lambda c: c not in ID_ALPHABET
)


def with_bad_char(alphabet: str, max_size: int) -> st.SearchStrategy[str]:
    """Otherwise valid text with at least one bad character somewhere in it."""
    part = st.text(alphabet=alphabet, max_size=max_size)
    return st.builds(lambda a, c, b: a + c + b, part, bad_chars, part)


NOT_TEXT = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)

bad_ids = st.one_of(
    st.just(""),
    st.text(alphabet=ID_ALPHABET, min_size=65, max_size=200),  # too long
    with_bad_char(ID_ALPHABET, 30),
    st.text(),  # anything at all, filtered below
    st.integers(min_value=10**64),  # 65 digits and more
    st.integers(max_value=-(10**64)),
    st.just(10**5000),  # str() of it raises ValueError past 4300 digits
    NOT_TEXT,
).filter(lambda value: not _is_valid_id(value))

bad_types = st.one_of(
    st.just(""),
    st.text(alphabet=TYPE_ALPHABET, min_size=33, max_size=80).map(lambda s: "a" + s),
    st.sampled_from(["Story", "STORY", "1story", "_story", "story-x", "story.x", "views"]),
    st.sampled_from(["viewmw", "viewed", "daily_views"]),  # viewmw's own names
    with_bad_char(TYPE_ALPHABET, 10).map(lambda s: "a" + s),
    st.text(),
    st.integers(),
    st.just(10**5000),
    NOT_TEXT,
).filter(lambda value: not _is_valid_type(value))

bad_viewers = st.one_of(
    st.sampled_from(
        [
            "",
            "1",
            "user",
            "user:",
            "anon:",
            "admin:1",
            "User:1",
            "user:1:2",
            "user: 1",
            "anon:1.2.3.4",  # a raw IPv4 address
            "anon:203.0.113.7",
            "anon:::1",  # raw IPv6 addresses
            "anon:2001:db8::1",
            "anon:[2001:db8::1]",
            "anon:Mozilla/5.0 (X11; Linux x86_64)",  # a raw user agent
            "anon:a@example.com",
            "anon:" + "a" * 65,
        ]
    ),
    st.builds(
        lambda kind, token: f"{kind}:{token}",
        st.sampled_from(["user", "anon"]),
        st.one_of(
            st.just(""),
            st.text(alphabet=ID_ALPHABET, min_size=65, max_size=200),
            with_bad_char(ID_ALPHABET, 30),
        ),
    ),
    st.text(),
    st.integers(),
    NOT_TEXT,
).filter(lambda value: not _is_valid_viewer(value))


def _is_valid_id(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return -(10**64) < value < 10**64
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 64
        and all(c in ID_ALPHABET for c in value)  # an oracle independent of the module's regex
    )


def _is_valid_type(value: object) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 32
        and value[0] in string.ascii_lowercase
        and all(c in TYPE_ALPHABET for c in value)
        and value not in ("viewmw", "viewed", "daily_views", "views")
    )


def _is_valid_viewer(value: object) -> bool:
    if not isinstance(value, str):
        return False
    kind, _, token = value.partition(":")
    return kind in ("user", "anon") and isinstance(token, str) and _is_valid_id(token)


# Tripwires --------------------------------------------------------------------------------------


class Tripwire:
    """Stands in for a Redis client or a store: any use is recorded and fails.

    Only ``register_script`` (called once when the tracker is built) is allowed.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def register_script(self, source: str) -> Tripwire:
        return self

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"{name} was used after a bad name")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("__call__")
        raise AssertionError("a script was run after a bad name")


def tripwire_tracker() -> tuple[ViewTracker, Tripwire, Tripwire]:
    redis, store = Tripwire(), Tripwire()
    tracker = ViewTracker(redis, store, Settings(), clock=FakeClock())  # type: ignore[arg-type]
    return tracker, redis, store


def refused_before_any_call(call: Callable[[ViewTracker], Awaitable[Any]]) -> None:
    """``call`` on a tripwire tracker raises InvalidKeyError, and nothing was touched."""
    tracker, redis, store = tripwire_tracker()
    with pytest.raises(InvalidKeyError):
        asyncio.run(_awaited(call(tracker)))
    assert redis.calls == [] and store.calls == []


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


CHECKS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CHECKS
@given(bad_ids)
def test_bad_content_ids_are_refused_before_redis_or_the_database(content_id: Any) -> None:
    with pytest.raises(InvalidKeyError):
        validate_content_id(content_id)
    refused_before_any_call(lambda t: t.track_view("story", content_id, "user:1"))
    refused_before_any_call(lambda t: t.get_view_count("story", content_id))
    refused_before_any_call(lambda t: t.get_view_counts("story", [1, content_id, 2]))
    refused_before_any_call(lambda t: t.get_view_count_details("story", [content_id]))
    refused_before_any_call(lambda t: t.get_redis_view_count("story", content_id))
    refused_before_any_call(lambda t: t.get_database_view_count("story", content_id))


@CHECKS
@given(bad_types)
def test_bad_content_types_are_refused_before_redis_or_the_database(content_type: Any) -> None:
    with pytest.raises(InvalidKeyError):
        validate_content_type(content_type)
    refused_before_any_call(lambda t: t.track_view(content_type, 7, "user:1"))
    refused_before_any_call(lambda t: t.get_view_counts(content_type, [7]))
    refused_before_any_call(lambda t: t.get_redis_view_count(content_type, 7))
    refused_before_any_call(lambda t: t.get_database_view_count(content_type, 7))


@CHECKS
@given(bad_viewers)
def test_bad_viewers_are_refused_before_redis(viewer: Any) -> None:
    with pytest.raises(InvalidKeyError):
        validate_viewer(viewer)
    refused_before_any_call(lambda t: t.track_view("story", 7, viewer))


def test_the_tripwire_does_trip() -> None:
    """The tripwire tests above would notice a call: a valid view does reach the client."""
    tracker, redis, _ = tripwire_tracker()
    with pytest.raises(AssertionError):
        asyncio.run(_awaited(tracker.get_view_counts("story", [7])))
    assert redis.calls


def test_error_messages_are_short_even_for_huge_input() -> None:
    for bad in ("x" * 10_000, 10**5000, "é" * 10_000):
        with pytest.raises(InvalidKeyError) as error:
            validate_content_id(bad)
        assert len(str(error.value)) < 200


# Valid names round-trip -------------------------------------------------------------------------

valid_text_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=64)
valid_int_ids = st.integers(min_value=-(10**63) + 1, max_value=10**64 - 1)
valid_types = st.text(alphabet=TYPE_ALPHABET, max_size=31).map(lambda s: "t" + s)


@CHECKS
@given(valid_types, valid_text_ids | valid_int_ids, valid_text_ids)
def test_valid_names_round_trip_through_every_key(
    content_type: str, raw_id: Any, token: str
) -> None:
    content_id = validate_content_id(raw_id)
    assert content_id == (str(raw_id) if isinstance(raw_id, int) else raw_id)
    assert validate_content_type(content_type) == content_type
    viewer = validate_viewer(f"user:{token}")

    for prefix in ("", "app1:"):
        keys = KeySchema(prefix)
        pending = keys.pending(content_type, content_id)
        assert pending == f"{prefix}{content_type}:views:{content_id}"
        assert pending.removeprefix(prefix).split(":") == [content_type, "views", content_id]
        assert keys.split_member(keys.member(content_type, content_id)) == (
            content_type,
            content_id,
        )
        assert keys.sessions(viewer) == f"{prefix}viewed:{viewer}"
        assert keys.pair_session(viewer, content_type, content_id) == (
            f"{prefix}viewed:{viewer}:{content_type}:{content_id}"
        )
        # Only pending counters match the pattern operators scan for (``*:views:*``), whatever
        # the names; the one exception is a viewer whose token is exactly "views" (see keys.md).
        if token != "views":
            others = [
                keys.sessions(viewer),
                keys.pair_session(viewer, content_type, content_id),
                keys.daily_views(viewer, "2025-11-24"),
                keys.syncing(content_type, content_id),
                keys.database_count(content_type, content_id),
                keys.dirty,
                keys.epoch,
                keys.sync_lock,
                keys.sync_batch,
                keys.sync_batch_items("b1"),
                keys.sync_fence,
                keys.mapping,
                keys.draining,
            ]
            assert fnmatch.fnmatchcase(pending, keys.pending_pattern)
            assert not [k for k in others if fnmatch.fnmatchcase(k, keys.pending_pattern)]


EDGE_IDS: list[str | int] = [
    "0",
    "007",
    "a",
    "-",
    "_",
    "-5",
    "A-z_09",
    "x" * 64,
    "views",
    "syncing",
    "dbviews",
    7,
    10**63,
    -(10**63) + 1,
]


async def test_valid_ids_round_trip_through_real_redis(
    real_redis: aioredis.Redis, clock: FakeClock
) -> None:
    limits = Limits(max_daily_views_per_user=None)
    tracker = ViewTracker(
        real_redis, None, Settings(limits=limits, **GENEROUS_DEADLINES), clock=clock
    )
    for content_id in EDGE_IDS:
        assert (await tracker.track_view("story", content_id, "user:1")).counted
    as_text = [str(content_id) for content_id in EDGE_IDS]
    assert len(set(as_text)) == len(EDGE_IDS)
    assert await tracker.get_view_counts("story", EDGE_IDS) == dict.fromkeys(as_text, 1)
    pending = sorted([key.decode() async for key in real_redis.scan_iter(match="*:views:*")])
    assert pending == sorted(f"story:views:{content_id}" for content_id in as_text)
    members = {member.decode() for member in await real_redis.smembers("viewmw:dirty")}
    assert members == {f"story:{content_id}" for content_id in as_text}


async def test_reserved_content_types_are_refused(real_redis: aioredis.Redis) -> None:
    tracker = ViewTracker(real_redis, None, Settings(**GENEROUS_DEADLINES))
    for reserved in ("viewmw", "viewed", "daily_views", "views"):
        with pytest.raises(InvalidKeyError, match="not one of"):
            await tracker.track_view(reserved, 7, "user:1")
    assert await real_redis.dbsize() == 0


# Templates, filled by Lua's string.format, give exactly the keys the schema builds -----------

TEMPLATE_PREFIXES = ["", "app1:", "100%:", "%s%d%%:"]


async def test_templates_filled_in_lua_give_the_schema_keys(real_redis: aioredis.Redis) -> None:
    fill = real_redis.register_script("return string.format(ARGV[1], unpack(ARGV, 2))")
    schemas = [KeySchema(prefix) for prefix in TEMPLATE_PREFIXES]
    # A content shard's schema (Redis Cluster) fills its templates with its tag in place.
    schemas += [KeySchema(prefix, 5, 128) for prefix in TEMPLATE_PREFIXES]
    for keys in schemas:
        expected = {
            keys.pending_template: (keys.pending, ("story", "7")),
            keys.syncing_template: (keys.syncing, ("story", "7")),
            keys.database_count_template: (keys.database_count, ("story", "7")),
            keys.days_template: (keys.days, ("story", "x-1")),
            keys.ranking_template: (keys.ranking, ("story", "2026-11-30")),
            keys.sync_batch_items_template: (keys.sync_batch_items, ("b%s1",)),
            keys.sync_batch_days_template: (keys.sync_batch_days, ("b1",)),
            # Filled as (type, day, id): the order in which the key names them.
            keys.uniques_template: (
                lambda t, day, i, keys=keys: keys.uniques(t, i, day),
                ("story", "2026-11-30", "7"),
            ),
        }
        for template, (build, args) in expected.items():
            filled = await fill(args=[template, *args])
            assert filled.decode() == build(*args), (keys, template)
