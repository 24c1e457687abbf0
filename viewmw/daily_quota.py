"""The daily limit across slots: each view's place in its viewer's quota for the day, reserved
before its content's rules are decided and given back if they block it (docs/keys.md, *The daily
limit: the one rule across slots*).

On a single Redis the daily counter is checked and counted in the same ``record_views`` call as
every other rule, and this module is not used. On a Redis Cluster the counter is in the viewer's
shard and the content's keys in the content's, so a view is decided in three calls, each atomic
in its own slot: :meth:`DailyQuota.reserve`, then ``record_views`` with the answer, then
:meth:`DailyQuota.release` for a reserved view that a content rule blocked. Every step is keyed
by the view's id, so a retried or replayed step changes nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from viewmw.errors import MalformedReplyError
from viewmw.keys import KeySchema, viewer_shard
from viewmw.scripts import ScriptRunner, Scripts, run_on_client


class Reservation(IntEnum):
    """A view's answer from :meth:`DailyQuota.reserve`."""

    RESERVED = 1
    """The view has a place: the daily limit lets it pass (``record_views`` quota ``"r"``)."""
    FULL = 0
    """No place left: the daily limit blocks it unless an earlier rule does (quota ``"f"``)."""
    RELEASED = -1
    """The view had a place and gave it back: it was decided and blocked before (a replay)."""


@dataclass(frozen=True, slots=True)
class QuotaClaim:
    """One view's claim on its viewer's quota for a calendar day.

    Attributes:
        viewer: the viewer (``user:…`` or ``anon:…``).
        day: the view's calendar day, ``YYYY-MM-DD``.
        view_id: the view's own id (a replayed view keeps it): what makes every step idempotent.
        ttl: seconds the day's hash is kept (the rest of the day and a grace period).
    """

    viewer: str
    day: str
    view_id: str
    ttl: int


class DailyQuota:
    """Reserves and releases places in viewers' daily quotas, one script call per viewer shard.

    Args:
        redis: a ``redis.asyncio`` client, or a ``RedisCluster`` one (each call goes to the node
            of its shard; calls for several shards run concurrently).
        keys: any content shard's key schema (its prefix and shard count name the keys).
        scripts: the scripts registered on ``redis`` (registered here when not given).
        run: how a script call is sent (through ``redis`` unless given; see
            :mod:`viewmw.node_connections`).
    """

    def __init__(
        self,
        redis: Any,
        keys: KeySchema,
        scripts: Scripts | None = None,
        run: ScriptRunner = run_on_client,
    ) -> None:
        if keys.shard is None:
            # On a single Redis the same name is the daily counter that record_views counts.
            raise ValueError("a daily quota is kept only on a Redis Cluster (a sharded KeySchema)")
        self.redis = redis
        self.keys = keys
        self.scripts = scripts or Scripts.register(redis)
        self.run = run

    async def reserve(self, claims: Sequence[QuotaClaim], limit: int) -> list[Reservation]:
        """Reserve a place for each claim, in order, under a limit of ``limit`` views per
        viewer and day; one answer per claim. A claim whose view id holds a place already gets
        :attr:`Reservation.RESERVED` again and takes no second place. Raises the first error
        of any viewer shard's call (:meth:`reserve_each` keeps them apart)."""
        answers = await self.reserve_each(claims, limit)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return [answer for answer in answers if isinstance(answer, Reservation)]

    async def reserve_each(
        self, claims: Sequence[QuotaClaim], limit: int
    ) -> list[Reservation | Exception]:
        """As :meth:`reserve`, but per claim its answer or the exception its viewer shard's
        call raised: a node that fails fails only the claims of its own viewers."""
        if limit < 1:
            raise ValueError(f"the daily limit must be at least 1, not {limit}")
        groups = self._by_shard(claims)
        replies = await asyncio.gather(
            *(self._call(self.scripts.reserve_daily, group, [limit], True) for group in groups),
            return_exceptions=True,
        )
        answers: list[Reservation | Exception] = [MalformedReplyError("no reply")] * len(claims)
        for group, reply in zip(groups, replies, strict=True):
            for (position, _), answer in zip(group, self._answers(reply, len(group)), strict=True):
                answers[position] = answer
        return answers

    @staticmethod
    def _answers(reply: Any, count: int) -> list[Reservation | Exception]:
        """One group's reply as an answer per claim (its error, shared, if it failed)."""
        if isinstance(reply, BaseException):
            if not isinstance(reply, Exception):  # a cancellation ends the whole batch
                raise reply
            return [reply] * count
        if not isinstance(reply, list) or len(reply) != count:
            error = MalformedReplyError(f"unexpected reply from reserve_daily: {reply!r:.80}")
            return [error] * count
        try:
            return [Reservation(int(answer)) for answer in reply]
        except (TypeError, ValueError):
            error = MalformedReplyError(f"unexpected reply from reserve_daily: {reply!r:.80}")
            return [error] * count

    async def release(self, claims: Sequence[QuotaClaim]) -> int:
        """Give back the place of each claim that still holds one; returns how many did."""
        groups = self._by_shard(claims)
        replies = await asyncio.gather(
            *(self._call(self.scripts.release_daily, group, [], False) for group in groups)
        )
        return sum(int(reply) for reply in replies)

    def _by_shard(self, claims: Sequence[QuotaClaim]) -> list[list[tuple[int, QuotaClaim]]]:
        """The claims (with their positions) grouped by viewer shard: one slot per group."""
        groups: dict[int, list[tuple[int, QuotaClaim]]] = {}
        for position, claim in enumerate(claims):
            shard = viewer_shard(claim.viewer, self.keys.shards)
            groups.setdefault(shard, []).append((position, claim))
        return list(groups.values())

    async def _call(
        self, script: Any, group: list[tuple[int, QuotaClaim]], head: list[Any], with_ttl: bool
    ) -> Any:
        keys: list[str] = []
        index: dict[str, int] = {}
        args: list[Any] = list(head)
        for _, claim in group:
            key = self.keys.daily_views(claim.viewer, claim.day)
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            args += [index[key], claim.view_id]
            if with_ttl:
                args.append(claim.ttl)
        return await self.run(script, keys, args)
