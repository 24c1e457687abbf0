"""The Redis key schema, and the validation every name passes before it becomes part of a key.

The names of the original service are kept (``{type}:views:{id}``, ``viewed:…``, ``daily_views:…``),
so ``redis-cli --scan --pattern '*:views:*'`` still finds exactly the pending counters. The keys
viewmw adds stay out of that pattern.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from viewmw.errors import InvalidKeyError

_CONTENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_CONTENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VIEWER = re.compile(r"(user|anon):[A-Za-z0-9_-]{1,64}")
# Content types that would make a key collide with viewmw's own names, or (``views``) put a
# tracking key such as ``viewed:user:1:views:7`` under the pending counters' ``*:views:*``.
_RESERVED_TYPES = frozenset({"viewmw", "viewed", "daily_views", "views"})
# Integers with more digits than an id may have are refused before str() or repr(), which are
# slow on them and raise a plain ValueError past 4300 digits.
_MAX_INT_ID = 10**64


def _shown(value: object) -> str:
    """``repr(value)`` cut to 80 characters, for error messages; safe for any value."""
    if isinstance(value, int) and not -_MAX_INT_ID < value < _MAX_INT_ID:
        return "an integer of more than 64 digits"
    try:
        return repr(value)[:80]
    except Exception:
        return f"a {type(value).__name__}"


def validate_content_type(content_type: object) -> str:
    """Return ``content_type`` if it is a lowercase token (``story``, ``fan_fiction``)."""
    if (
        not isinstance(content_type, str)
        or not _CONTENT_TYPE.fullmatch(content_type)
        or content_type in _RESERVED_TYPES
    ):
        raise InvalidKeyError(
            f"content type must be 1-32 lowercase letters, digits or '_', starting with a letter,"
            f" and not one of {sorted(_RESERVED_TYPES)}: {_shown(content_type)}"
        )
    return content_type


def validate_content_id(content_id: object) -> str:
    """Return the id as text if it is 1-64 ASCII letters, digits, ``-`` or ``_``, else raise.

    Integers are accepted and written in decimal (``42`` -> ``"42"``).
    """
    if isinstance(content_id, int) and not isinstance(content_id, bool):
        content_id = str(content_id) if -_MAX_INT_ID < content_id < _MAX_INT_ID else content_id
    if not isinstance(content_id, str) or not _CONTENT_ID.fullmatch(content_id):
        raise InvalidKeyError(
            f"content id must be 1-64 ASCII letters, digits, '-' or '_': {_shown(content_id)}"
        )
    return content_id


def validate_viewer(viewer: object) -> str:
    """Return ``viewer`` if it is ``user:<token>`` or ``anon:<token>``, else raise.

    Build viewers with :mod:`viewmw.identity`, which never puts personal data in the token.
    """
    if not isinstance(viewer, str) or not _VIEWER.fullmatch(viewer):
        raise InvalidKeyError(
            f"viewer must be 'user:<id>' or 'anon:<hash>' with 1-64 ASCII letters, digits,"
            f" '-' or '_' after the colon: {_shown(viewer)}"
        )
    return viewer


def viewer_shard(viewer: str, shards: int) -> int:
    """The viewer shard of ``viewer`` among ``shards``: a stable hash (CRC-32), the same in every
    process and version, never Python's salted ``hash()``."""
    return zlib.crc32(viewer.encode()) % shards


def content_shard(content_type: str, content_id: str, shards: int) -> int:
    """The content shard of one content among ``shards`` (CRC-32 of its member name)."""
    return zlib.crc32(f"{content_type}:{content_id}".encode()) % shards


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Builds every Redis key viewmw uses, under an optional prefix.

    On a single Redis ``shard`` is ``None`` and every key has the name it always had. On a Redis
    Cluster each content belongs to one of ``shards`` content shards (see
    :class:`viewmw.shards.ContentShards`), and the schema of shard ``N`` puts the hash tag
    ``{c:N}`` into every key about its contents and into its own copy of the keys that are global
    on a single Redis (dirty set, epoch, batch, rankings), so that one script call on them stays
    in one slot. The daily counter of a viewer carries the viewer's shard ``{v:M}`` instead, and
    the sync lock and its fence counter share the tag ``{sync}`` (docs/keys.md, *Redis Cluster*).

    The methods do not validate; :class:`viewmw.tracker.ViewTracker` validates names once per call
    before it builds keys. No valid name holds ``{`` or ``}``, so no name can move a key to
    another slot.
    """

    prefix: str = ""
    shard: int | None = None
    shards: int = 1
    # The shard's tag where a key names one content (or event, or batch): before its id; and at
    # the end of a key that a single Redis holds once. Both empty on a single Redis. Computed
    # once: a session key is built on every request.
    _at: str = field(init=False, repr=False, compare=False)
    _of_shard: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tagged = self.shard is not None
        object.__setattr__(self, "_at", f"{{c:{self.shard}}}:" if tagged else "")
        object.__setattr__(self, "_of_shard", f":{{c:{self.shard}}}" if tagged else "")

    # Keys of the original service.
    def pending(self, content_type: str, content_id: str) -> str:
        """Views counted in Redis and not yet moved into a sync batch (a counter)."""
        return f"{self.prefix}{content_type}:views:{self._at}{content_id}"

    def sessions(self, viewer: str) -> str:
        """One hash per viewer: a field per content (``{type}:{id}``) holding the session's count
        and start and the last counted view. On a cluster, one per viewer and content shard."""
        return f"{self.prefix}viewed:{viewer}{self._of_shard}"

    def pair_session(self, viewer: str, content_type: str, content_id: str) -> str:
        """The one-hash-per-(viewer, content) session of earlier versions: still read (and
        folded into :meth:`sessions` at the pair's next counted view) until the last expires."""
        return f"{self.prefix}viewed:{viewer}:{content_type}:{self._at}{content_id}"

    def daily_views(self, viewer: str, day: str) -> str:
        """Views counted for ``viewer`` on calendar ``day`` (``YYYY-MM-DD``), all content.

        On a cluster the key is in the viewer's shard, whatever the schema's content shard.
        """
        if self.shard is None:
            return f"{self.prefix}daily_views:{viewer}:{day}"
        return f"{self.prefix}daily_views:{{v:{viewer_shard(viewer, self.shards)}}}:{viewer}:{day}"

    # Keys added by viewmw.
    def syncing(self, content_type: str, content_id: str) -> str:
        """Views moved out of pending into the unsettled sync batch."""
        return f"{self.prefix}{content_type}:syncing:{self._at}{content_id}"

    def database_count(self, content_type: str, content_id: str) -> str:
        """Cached database count, so the hot path needs no SQL."""
        return f"{self.prefix}{content_type}:dbviews:{self._at}{content_id}"

    @property
    def dirty(self) -> str:
        """Set of ``{type}:{id}`` members that have pending views."""
        return f"{self.prefix}viewmw:dirty{self._of_shard}"

    @property
    def draining(self) -> str:
        """Contents a running sync took from the dirty set and has not snapshotted yet."""
        return f"{self.prefix}viewmw:dirty:sync{self._of_shard}"

    @property
    def epoch(self) -> str:
        """Counter bumped whenever a sync moves views between pending, syncing and the database.

        A cache fill carries the epoch it started under and is dropped if it changed meanwhile, so
        a database count read before a sync can never be cached over what the sync settled.
        """
        return f"{self.prefix}viewmw:epoch{self._of_shard}"

    @property
    def _sync(self) -> str:
        """Where the sync lock and its fence counter are named: one slot for both on a cluster."""
        return "sync:" if self.shard is None else "{sync}:"

    @property
    def sync_lock(self) -> str:
        """One sync at a time: holds the owner's token, with an expiry that the owner renews."""
        return f"{self.prefix}viewmw:{self._sync}lock"

    @property
    def sync_batch(self) -> str:
        """The unsettled batch: a hash with its id and when it started."""
        return f"{self.prefix}viewmw:sync:batch{self._of_shard}"

    @property
    def sync_fence(self) -> str:
        """Fencing tokens: a counter taken with the sync lock, larger for every later holder."""
        return f"{self.prefix}viewmw:{self._sync}fence"

    @property
    def sync_fence_floor(self) -> str:
        """On a cluster, the newest fence that has acted on this shard's batch: the sync lock is
        in another slot, so the batch scripts refuse an older fence by this key instead (see
        ``lua/shared/holds_sync.lua``). Not used on a single Redis, where they check the lock."""
        return f"{self.prefix}viewmw:sync:floor{self._of_shard}"

    def sync_batch_items(self, batch_id: str) -> str:
        """Amounts moved by one batch: a hash ``{type}:{id}`` -> views, keyed by its batch id so
        that no sync can ever read another batch's items."""
        return f"{self.prefix}viewmw:sync:batch:{self._at}{batch_id}:items"

    @property
    def legacy_sync_batch_items(self) -> str:
        """Where versions before fencing kept the unsettled batch's items (moved on recovery)."""
        return f"{self.prefix}viewmw:sync:batch:{self._at}items"  # never exists on a cluster

    def sync_batch_days(self, batch_id: str) -> str:
        """Per-day amounts moved by one batch: a hash ``{type}:{id}`` -> the content's days hash
        fields and amounts, encoded ``field=amount,field=amount`` (see docs/history.md)."""
        return f"{self.prefix}viewmw:sync:batch:{self._at}{batch_id}:days"

    # Keys of the per-day history (see docs/history.md).
    def days(self, content_type: str, content_id: str) -> str:
        """Pending views per calendar day of one content: a hash ``YYYY-MM-DD`` -> views (their
        sum is always the pending counter) and ``YYYY-MM-DD:c`` -> crawler views."""
        return f"{self.prefix}{content_type}:days:{self._at}{content_id}"

    def uniques(self, content_type: str, content_id: str, day: str) -> str:
        """HyperLogLog of the viewers who offered a view of one content on ``day``. The day
        comes first, so that no id (``views``) puts the key under ``*:views:*``."""
        return f"{self.prefix}{content_type}:uniq:{day}:{self._at}{content_id}"

    def ranking(self, content_type: str, day: str) -> str:
        """Views of ``day`` not yet settled into the history, per content id of one type (a
        sorted set): the real-time part of :meth:`viewmw.analytics.ViewStats.top`."""
        return f"{self.prefix}viewmw:top:{content_type}:{day}{self._of_shard}"

    def blocked(self, day: str) -> str:
        """Views blocked on ``day``, per reason (a hash)."""
        return f"{self.prefix}viewmw:blocked:{day}{self._of_shard}"

    def merged_sketch(
        self, content_type: str, content_id: str, first: str, last: str, epoch: int | str
    ) -> str:
        """The viewers of one content's days ``first`` to ``last`` (``start``: from its first
        day) as the history's sketches hold them, merged by a read for the next reads of the
        same sync ``epoch`` (a HyperLogLog, with a TTL)."""
        return (
            f"{self.prefix}viewmw:kept:{content_type}:{first}:{last}:{epoch}:{self._at}{content_id}"
        )

    def scratch(self, token: str) -> str:
        """A short-lived key a read script fills and deletes in the same call."""
        return f"{self.prefix}viewmw:scratch:{self._at}{token}"

    def replay_marker(self, event_id: str) -> str:
        """Set when an outage event is replayed, so that it is decided once (with a TTL)."""
        return f"{self.prefix}viewmw:replayed:{self._at}{event_id}"

    @property
    def mapping(self) -> str:
        """Where the app records which table each content type's counts go to (a hash)."""
        return f"{self.prefix}viewmw:mapping"

    # Templates for scripts that learn a content, day or batch only while they run (a member
    # taken from the dirty set, the batch id read from the batch hash). Lua fills them with
    # ``string.format``, so each key's layout is still written only in the methods above.
    @property
    def _escaped(self) -> KeySchema:
        return KeySchema(self.prefix.replace("%", "%%"), self.shard, self.shards)

    @property
    def pending_template(self) -> str:
        """:meth:`pending` as a ``string.format`` template of (type, id)."""
        return self._escaped.pending("%s", "%s")

    @property
    def syncing_template(self) -> str:
        """:meth:`syncing` as a ``string.format`` template of (type, id)."""
        return self._escaped.syncing("%s", "%s")

    @property
    def database_count_template(self) -> str:
        """:meth:`database_count` as a ``string.format`` template of (type, id)."""
        return self._escaped.database_count("%s", "%s")

    @property
    def days_template(self) -> str:
        """:meth:`days` as a ``string.format`` template of (type, id)."""
        return self._escaped.days("%s", "%s")

    @property
    def ranking_template(self) -> str:
        """:meth:`ranking` as a ``string.format`` template of (type, day)."""
        return self._escaped.ranking("%s", "%s")

    @property
    def sync_batch_items_template(self) -> str:
        """:meth:`sync_batch_items` as a ``string.format`` template of (batch id)."""
        return self._escaped.sync_batch_items("%s")

    @property
    def sync_batch_days_template(self) -> str:
        """:meth:`sync_batch_days` as a ``string.format`` template of (batch id)."""
        return self._escaped.sync_batch_days("%s")

    @property
    def uniques_template(self) -> str:
        """:meth:`uniques` as a ``string.format`` template of (type, day, id): the order in
        which the key names them."""
        return self._escaped.uniques("%s", "%s", "%s")

    def merged_sketch_template(
        self, content_type: str, content_id: str, first: str, last: str
    ) -> str:
        """:meth:`merged_sketch` as a ``string.format`` template of (epoch)."""
        return self._escaped.merged_sketch(content_type, content_id, first, last, "%s")

    # Patterns for SCAN (statistics and cleanup only; never on the request path).
    @property
    def pending_pattern(self) -> str:
        """Matches every pending counter."""
        return f"{self.prefix}*:views:*"

    @property
    def session_pattern(self) -> str:
        """Matches every viewer's session hash (and the per-pair hashes of earlier versions)."""
        return f"{self.prefix}viewed:*"

    @property
    def daily_views_pattern(self) -> str:
        """Matches every per-viewer daily counter."""
        return f"{self.prefix}daily_views:*"

    @staticmethod
    def member(content_type: str, content_id: str) -> str:
        """The dirty-set and batch member for one content."""
        return f"{content_type}:{content_id}"

    @staticmethod
    def split_member(member: str) -> tuple[str, str]:
        """Inverse of :meth:`member`."""
        content_type, _, content_id = member.partition(":")
        return content_type, content_id
