"""Moving the rules' state from one Redis to another: a single Redis to a Redis Cluster, or a
cluster to one with another number of content shards (docs/keys.md, *Moving a single-node
deployment to a cluster*).

Pending views are never copied: the sync moves them into the database from the old Redis, exactly
once, before this runs. What is copied is what keeps viewers from being counted again after the
move, each key under its name in the new layout, with the time it had left to live:

- the viewers' session hashes (``viewed:{viewer}``), each content's field into the hash of its
  shard on the target (and the per-pair session hashes of earlier versions, renamed);
- the viewers' daily counters of the days not over yet (a string on a single Redis, the quota
  hash's ``n`` on a cluster);
- the unique-viewer sketches (``…:uniq:…``), merged into the history at the next syncs;
- the replay markers of outage events still waiting in the outbox (a marker's name does not say
  its content, so the outbox is asked; a marker of an event no longer waiting protects nothing).

A key the new Redis already has is left as it is (views counted there since the move stand), so
running the copy twice copies nothing the second time. Sessions and sketches are copied with
``DUMP``/``RESTORE``: both servers must run the same Redis major version (or the new one a later).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from viewmw.errors import ConfigurationError
from viewmw.outage.outbox import Outbox
from viewmw.scripts import Scripts
from viewmw.shards import ContentShards

_VIEWER = r"(?P<viewer>(?:user|anon):[A-Za-z0-9_-]{1,64})"
_TYPE = r"(?P<type>[a-z][a-z0-9_]{0,31})"
_ID = r"(?P<id>[A-Za-z0-9_-]{1,64})"
_DAY = r"(?P<day>\d{4}-\d{2}-\d{2})"
_CONTENT_TAG = r"(?:\{c:\d+\}:)?"  # a cluster's content shard tag, absent on a single Redis
_PAIR_SESSION = re.compile(rf"viewed:{_VIEWER}:{_TYPE}:{_CONTENT_TAG}{_ID}")
_SESSIONS = re.compile(rf"viewed:{_VIEWER}(?::\{{c:\d+\}})?")
_MEMBER = re.compile(rf"{_TYPE}:{_ID}")
_DAILY = re.compile(rf"daily_views:(?:\{{v:\d+\}}:)?{_VIEWER}:{_DAY}")
_UNIQUES = re.compile(rf"{_TYPE}:uniq:{_DAY}:{_CONTENT_TAG}{_ID}")
_MARKER = re.compile(rf"viewmw:replayed:{_CONTENT_TAG}(?P<event>[0-9a-f]{{32}})")
_PAGE = 500  # keys per round trip
_CONCURRENT = 50  # script calls in flight at once


@dataclass
class MigrationReport:
    """What a copy did, per kind of key: copied, or left because the new Redis had it."""

    sessions: int = 0
    """(viewer, content) sessions."""
    daily_counters: int = 0
    sketches: int = 0
    replay_markers: int = 0
    sketches_merged: int = 0
    """Sketches the target had already (viewers seen since the move): the old one added in."""
    already_there: int = 0
    skipped_markers: int = 0
    """Markers of events no longer in the outbox (or of every event, without an outbox)."""


class KeyMigration:
    """Copies the rules' state from ``source`` to ``target``.

    Args:
        source: the Redis moved from, a ``redis.asyncio`` client (``Redis`` or ``RedisCluster``).
        target: the Redis moved to, a client of either kind.
        source_shards: the source's key layout (``Settings.content_shards()`` with its URL).
        target_shards: the target's key layout: with ``source_shards``, it names the same
            content's keys on each side.
        outbox: the app's outbox, to find the content of waiting events' replay markers; without
            one, no marker is copied.
    """

    def __init__(
        self,
        source: Any,
        target: Any,
        source_shards: ContentShards,
        target_shards: ContentShards,
        outbox: Outbox | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.prefix = source_shards.schemas[0].prefix
        self.target_shards = target_shards
        self.outbox = outbox
        self.scripts = Scripts.register(target)

    async def run(self) -> MigrationReport:
        """Copy every session hash, daily counter, sketch and waiting event's marker."""
        report = MigrationReport()
        async for page in self._pages(f"{self.prefix}viewed:*"):
            pairs = self._renamed(page, _PAIR_SESSION, self._pair_session_key)
            copied, there = await self._restore(pairs)
            report.sessions += copied
            report.already_there += len(there)
            await self._copy_sessions(page, report)
        async for page in self._pages(f"{self.prefix}*:uniq:*"):
            copied, there = await self._restore(self._renamed(page, _UNIQUES, self._uniques_key))
            await self._merge_sketches(there)
            report.sketches += copied
            report.sketches_merged += len(there)
        async for page in self._pages(f"{self.prefix}daily_views:*"):
            await self._copy_daily(page, report)
        async for page in self._pages(f"{self.prefix}viewmw:replayed:*"):
            await self._copy_markers(page, report)
        return report

    # Naming keys on the target ------------------------------------------------------------------

    def _pair_session_key(self, match: re.Match[str]) -> str:
        content_type, content_id = match["type"], match["id"]
        keys = self.target_shards.of(content_type, content_id)
        return keys.pair_session(match["viewer"], content_type, content_id)

    def _uniques_key(self, match: re.Match[str]) -> str:
        content_type, content_id = match["type"], match["id"]
        return self.target_shards.of(content_type, content_id).uniques(
            content_type, content_id, match["day"]
        )

    # Copying ------------------------------------------------------------------------------------

    async def _pages(self, pattern: str) -> AsyncIterator[list[str]]:
        """The source's keys matching ``pattern`` (every primary of a cluster), a page at a time."""
        page: list[str] = []
        async for key in self.source.scan_iter(match=pattern, count=_PAGE):
            page.append(key.decode() if isinstance(key, bytes) else key)
            if len(page) == _PAGE:
                yield page
                page = []
        if page:
            yield page

    def _parsed(self, key: str, pattern: re.Pattern[str]) -> re.Match[str] | None:
        """``key`` taken apart by ``pattern`` (after the prefix), or ``None`` when it is not a
        key of that kind (another app's key that the ``SCAN`` pattern also matched)."""
        if not key.startswith(self.prefix):
            return None
        return pattern.fullmatch(key[len(self.prefix) :])

    def _renamed(
        self, page: list[str], shape: re.Pattern[str], target_key: Callable[[re.Match[str]], str]
    ) -> list[tuple[str, str]]:
        """The keys of ``page`` that have ``shape``, each with its name on the target."""
        return [
            (key, target_key(match))
            for key in page
            if (match := self._parsed(key, shape)) is not None
        ]

    async def _restore(self, pairs: list[tuple[str, str]]) -> tuple[int, list[_Dumped]]:
        """``DUMP`` each source key and ``RESTORE`` it under its target name with the time it
        has left, never replacing; returns how many were copied, and the keys the target had
        already (with what was dumped)."""
        if not pairs:
            return 0, []
        async with self.source.pipeline(transaction=False) as pipe:
            for key, _ in pairs:
                pipe.dump(key)
                pipe.pttl(key)
            dumped = await pipe.execute()
        wanted = [
            _Dumped(name, payload, max(int(ttl), 0))
            for (_, name), payload, ttl in zip(pairs, dumped[::2], dumped[1::2], strict=True)
            if payload is not None and int(ttl) != -2  # not expired since the SCAN
        ]
        if not wanted:
            return 0, []
        async with self.target.pipeline(transaction=False) as pipe:
            for item in wanted:
                pipe.restore(item.name, item.ttl, item.payload)
            replies = await pipe.execute(raise_on_error=False)
        there: list[_Dumped] = []
        for item, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "payload version" in str(reply):
                    raise ConfigurationError(
                        "--from",
                        "names a Redis whose keys the Redis moved to cannot read (DUMP payload "
                        f"version: {reply}); run the same Redis version on both, or a later one "
                        "on the new side",
                    )
                if "BUSYKEY" not in str(reply):
                    raise reply
                there.append(item)
        return len(wanted) - len(there), there

    async def _merge_sketches(self, sketches: list[_Dumped]) -> None:
        """Add old sketches to those the target has (viewers seen since the move): each is
        restored beside its target, in its slot, merged into it and deleted. A union, so a
        second run changes nothing."""
        for key in sketches:
            scratch = f"{key.name}:moving"  # the same hash tag: the same slot
            await self.target.restore(scratch, 60_000, key.payload, replace=True)
            await self.target.pfmerge(key.name, key.name, scratch)
            await self.target.delete(scratch)

    async def _copy_sessions(self, page: list[str], report: MigrationReport) -> None:
        """Copy the viewers' session hashes of ``page``: each content's field goes into the
        viewer's hash of that content's shard on the target, unless that hash has it."""
        parsed = [
            (key, match) for key in page if (match := self._parsed(key, _SESSIONS)) is not None
        ]
        if not parsed:
            return
        async with self.source.pipeline(transaction=False) as pipe:
            for key, _ in parsed:
                pipe.hgetall(key)
                pipe.pttl(key)
            replies = await pipe.execute()
        # Per target hash: the longest TTL of its sources, then its fields and values.
        wanted: dict[str, list[Any]] = {}
        for (_, match), fields, ttl in zip(parsed, replies[::2], replies[1::2], strict=True):
            if int(ttl) <= 0:  # expired since the SCAN (or, against every rule, kept forever)
                continue
            for field, value in fields.items():
                member = _MEMBER.fullmatch(_text(field))
                if member is None:
                    continue
                keys = self.target_shards.of(member["type"], member["id"])
                args = wanted.setdefault(keys.sessions(match["viewer"]), [0])
                args[0] = max(args[0], int(ttl))
                args += (_text(field), _text(value))
        copied = sum(await _each(self.scripts.restore_sessions, list(wanted.items())))
        report.sessions += copied
        report.already_there += sum(len(args) // 2 for args in wanted.values()) - copied

    async def _copy_daily(self, page: list[str], report: MigrationReport) -> None:
        parsed = [(key, match) for key in page if (match := self._parsed(key, _DAILY)) is not None]
        if not parsed:
            return
        async with self.source.pipeline(transaction=False) as pipe:
            for key, _ in parsed:
                pipe.type(key)
                pipe.pttl(key)
            kinds_and_ttls = await pipe.execute()
        async with self.source.pipeline(transaction=False) as pipe:
            for (key, _), kind in zip(parsed, kinds_and_ttls[::2], strict=True):
                if _text(kind) == "hash":
                    pipe.hget(key, "n")
                else:
                    pipe.get(key)
            counts = await pipe.execute()
        shape = "hash" if self.target_shards.clustered else ""
        any_keys = self.target_shards.schemas[0]  # a daily counter's name is the viewer's
        wanted = [
            (any_keys.daily_views(match["viewer"], match["day"]), int(count), int(ttl))
            for (_, match), count, ttl in zip(parsed, counts, kinds_and_ttls[1::2], strict=True)
            if count is not None and int(ttl) > 0  # not expired since the SCAN
        ]
        calls = [(name, [count, ttl, shape]) for name, count, ttl in wanted]
        copied = sum(await _each(self.scripts.restore_daily, calls))
        report.daily_counters += copied
        report.already_there += len(calls) - copied

    async def _copy_markers(self, page: list[str], report: MigrationReport) -> None:
        events = {
            match["event"]: key for key in page if (match := self._parsed(key, _MARKER)) is not None
        }
        waiting = await self.outbox.contents_of(events) if self.outbox is not None else {}
        report.skipped_markers += len(events) - len(waiting)
        pairs = [
            (events[event_id], self.target_shards.of(*content).replay_marker(event_id))
            for event_id, content in waiting.items()
        ]
        copied, there = await self._restore(pairs)
        report.replay_markers += copied
        report.already_there += len(there)


@dataclass(frozen=True, slots=True)
class _Dumped:
    """A source key as ``DUMP`` gave it, with its name on the target and its TTL (ms, 0: none)."""

    name: str
    payload: bytes
    ttl: int


async def _each(script: AsyncScript, calls: list[tuple[str, list[Any]]]) -> list[int]:
    """``script`` run once per (key, arguments), concurrently, a few at a time: a cluster
    pipeline takes no scripts. Its replies, as integers, in order."""
    replies: list[int] = []
    for start in range(0, len(calls), _CONCURRENT):
        chunk = calls[start : start + _CONCURRENT]
        done = await asyncio.gather(*(script(keys=[key], args=args) for key, args in chunk))
        replies += map(int, done)
    return replies


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
