"""Who is viewing: viewer keys that carry no personal data, and the checks for crawlers and
prefetches.

An authenticated user is ``user:{id}``; an id that is not a short safe token (an e-mail address,
say) is replaced by a keyed hash. Anyone else is ``anon:{hash}``, an HMAC of client address and
user agent under the app's secret and the calendar day: the same visitor keeps one key through a
day, and yesterday's keys cannot be linked to today's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from crawlerdetect import CrawlerDetect
from starlette.types import Scope

from viewmw.calendar_day import calendar_day

logger = logging.getLogger("viewmw")

ViewerFunction = Callable[[Scope], object]
"""Gets the ASGI scope, returns the user's id (or an awaitable of it), or ``None`` if anonymous."""

# Opaque ids (database numbers, UUIDs) go into keys as they are; anything else (a username, an
# e-mail) may be personal data and is replaced by its keyed hash.
_OPAQUE_ID = re.compile(
    r"[0-9]{1,20}|[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
ANONYMOUS_HASH_CHARS = 16  # 96 bits: collisions stay negligible, keys stay short
USER_HASH_CHARS = 22  # 128 bits: hashed user ids must never merge two accounts
# crawlerdetect's regex costs grow with the length (quadratically on long runs of letters: a
# 10 kB user agent takes seconds), so only this much of a user agent is examined.
CRAWLER_CHECK_CHARS = 256
_PREFETCH_HEADERS = frozenset({b"sec-purpose", b"purpose", b"x-purpose", b"x-moz"})
_PREFETCH_WORDS = (b"prefetch", b"prerender", b"preview")
_PRIVACY_HEADERS = frozenset({b"dnt", b"sec-gpc"})


@cache
def _process_secret() -> bytes:
    """A random secret for this process, made once, with one warning."""
    logger.warning(
        "viewmw: no secret configured (VIEWMW_SECRET); using a random one for this process. "
        "Anonymous viewers and hashed user ids will differ between processes and restarts."
    )
    return secrets.token_bytes(32)


def secret_bytes(secret: str | None) -> bytes:
    """The configured secret as bytes, or this process's random one when it is ``None``."""
    return _process_secret() if secret is None else secret.encode()


# Crawler check -------------------------------------------------------------------------------

_detector = CrawlerDetect()


@lru_cache(maxsize=4096)
def _is_crawler_text(user_agent: str) -> bool:
    return bool(_detector.isCrawler(user_agent))


@lru_cache(maxsize=4096)
def _is_crawler_header(head: bytes) -> bool:
    """The verdict for a raw header's first :data:`CRAWLER_CHECK_CHARS` bytes: what a request
    pays is one slice and one cache lookup."""
    # latin-1 maps every byte, so no header can fail to decode.
    text = head.decode("latin-1").strip()
    return not text or _is_crawler_text(text)


def is_crawler(user_agent: bytes | str) -> bool:
    """Whether ``user_agent`` belongs to a crawler; an empty one counts as a bot.

    Results are cached per user agent (4096 of them), so the regular expressions run once per
    distinct browser.
    """
    if isinstance(user_agent, bytes):
        return _is_crawler_header(user_agent[:CRAWLER_CHECK_CHARS])
    text = user_agent[:CRAWLER_CHECK_CHARS].strip()
    return not text or _is_crawler_text(text)


# Request headers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSignals:
    """What the request headers say about the viewer, read in one pass.

    Attributes:
        user_agent: the first ``User-Agent`` header, raw (``b""`` if none).
        prefetch: the browser fetched the page speculatively (``Sec-Purpose: prefetch``,
            ``Purpose: prefetch``, ``prerender``, Safari's ``X-Purpose: preview``).
        privacy_opt_out: ``DNT: 1`` or ``Sec-GPC: 1``.
    """

    user_agent: bytes
    prefetch: bool
    privacy_opt_out: bool

    @classmethod
    def from_scope(cls, scope: Scope) -> RequestSignals:
        """Read the signals from an ASGI HTTP scope."""
        return cls(*read_signals(scope))


def read_signals(scope: Scope) -> tuple[bytes, bool, bool]:
    """:class:`RequestSignals`' fields (user agent, prefetch, privacy opt-out) as a tuple, for
    the request path, which only unpacks them."""
    user_agent: bytes | None = None
    prefetch = privacy = False
    for raw_name, value in scope.get("headers", ()):
        name = raw_name.lower()
        if name == b"user-agent":
            if user_agent is None:
                user_agent = value
        elif name in _PREFETCH_HEADERS:
            lowered = value.lower()
            prefetch = prefetch or any(word in lowered for word in _PREFETCH_WORDS)
        elif name in _PRIVACY_HEADERS:
            privacy = privacy or value.strip() == b"1"
    return user_agent or b"", prefetch, privacy


# Viewer keys ---------------------------------------------------------------------------------


def authenticated_id(scope: Scope) -> object | None:
    """The id of ``scope["user"]`` as Starlette's ``AuthenticationMiddleware`` sets it.

    The user must be authenticated; its ``id`` is used, else its ``identity`` (Starlette's
    ``SimpleUser`` has only a username there, which is then hashed). ``None`` when there is no
    such user.
    """
    user = scope.get("user")
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for attribute in ("id", "identity"):
        try:
            value: object = getattr(user, attribute)
        except (AttributeError, NotImplementedError):
            continue
        if value is not None and value != "":
            return value
    return None


class ViewerIdentity:
    """Builds the viewer key of a request.

    Args:
        secret: HMAC key (:attr:`viewmw.Settings.secret`); ``None`` uses a random one per process.
        timezone: the zone whose calendar day salts anonymous keys (the settings' time zone).
        viewer: returns the user id for a scope (or an awaitable of it), ``None`` for anonymous;
            replaces the ``scope["user"]`` lookup.
        clock: seconds since the epoch; the tracker's clock, so tests can move days.
        viewer_timeout: seconds an awaitable returned by ``viewer`` may take (then
            :class:`TimeoutError`).
    """

    def __init__(
        self,
        secret: str | None,
        timezone: str | ZoneInfo = "UTC",
        *,
        viewer: ViewerFunction | None = None,
        clock: Callable[[], float] = time.time,
        viewer_timeout: float = 0.25,
    ) -> None:
        self._viewer_timeout = viewer_timeout
        self._secret = secret_bytes(secret)
        self._zone = ZoneInfo(timezone) if isinstance(timezone, str) else timezone
        self._viewer = viewer
        self._clock = clock
        self._day_start = self._day_end = 0
        self._day_pads = _hmac_pads(b"")

    @property
    def has_viewer_function(self) -> bool:
        """Whether a ``viewer`` callable decides who is viewing (else :meth:`default_viewer`
        does, without awaiting anything)."""
        return self._viewer is not None

    async def viewer_for(self, scope: Scope, user_agent: bytes) -> str:
        """``user:…`` for an authenticated request, else ``anon:…``."""
        if self._viewer is None:
            return self.default_viewer(scope, user_agent)
        user_id = self._viewer(scope)
        if inspect.isawaitable(user_id):
            async with asyncio.timeout(self._viewer_timeout):
                user_id = await user_id
        return self._viewer_of(scope, user_agent, user_id)

    def default_viewer(self, scope: Scope, user_agent: bytes) -> str:
        """:meth:`viewer_for` without a ``viewer`` callable: ``scope["user"]``, else anonymous."""
        if "user" not in scope:  # no authentication middleware: anonymous, in fewer calls
            client = scope.get("client")
            return self.anonymous_viewer(str(client[0]) if client else "", user_agent)
        return self._viewer_of(scope, user_agent, authenticated_id(scope))

    def _viewer_of(self, scope: Scope, user_agent: bytes, user_id: object) -> str:
        if user_id is not None:
            key = self.user_viewer(user_id)
            if key is not None:
                return key
        client = scope.get("client")
        host = str(client[0]) if client else ""
        return self.anonymous_viewer(host, user_agent)

    def user_viewer(self, user_id: object) -> str | None:
        """``user:{id}`` for an opaque id (a number, a UUID); any other id is replaced by its keyed
        hash, so usernames and e-mail addresses never reach Redis."""
        if isinstance(user_id, bytes):
            raw = user_id
        else:
            text = str(user_id)
            if _OPAQUE_ID.fullmatch(text):
                return f"user:{text}"
            raw = text.encode("utf-8", "surrogatepass")
        if not raw:
            return None
        digest = hmac.digest(self._secret, b"user\0" + raw, "sha256")
        return f"user:{_b64(digest)[:USER_HASH_CHARS]}"

    def anonymous_viewer(self, client_host: str, user_agent: bytes) -> str:
        """``anon:{hash}`` of client address and user agent, keyed with secret and today."""
        # No address contains a newline, so the two parts cannot run together.
        message = client_host.encode("utf-8", "surrogatepass") + b"\n" + user_agent
        # HMAC-SHA256 from today's precomputed pads: two hash copies, no key schedule.
        inner, outer = self._pads_for_today()
        inner = inner.copy()
        inner.update(message)
        outer = outer.copy()
        outer.update(inner.digest())
        digest = outer.digest()
        # 12 bytes are exactly the first 16 base64 characters: the same key as _b64()[:16].
        encoded = binascii.b2a_base64(digest[:_ANONYMOUS_HASH_BYTES], newline=False)
        return "anon:" + encoded.translate(_URLSAFE).decode("ascii")

    def _pads_for_today(self) -> tuple[Any, Any]:
        """HMAC-SHA256's inner and outer hashes, keyed with secret + today's date, each fed its
        padded key once per calendar day (not per request)."""
        now = self._clock()
        if not self._day_start <= now < self._day_end:
            day = calendar_day(now, self._zone)
            self._day_start, self._day_end = day.start, day.end
            self._day_pads = _hmac_pads(self._secret + b"\0" + day.name.encode())
        return self._day_pads


_ANONYMOUS_HASH_BYTES = ANONYMOUS_HASH_CHARS * 3 // 4
_SHA256_BLOCK = 64
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states fed HMAC's inner and outer padded key (RFC 2104): copying them and
    hashing a message gives ``hmac.digest(key, message, "sha256")``."""
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_INNER_PAD)), hashlib.sha256(key.translate(_OUTER_PAD))


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode("ascii")
