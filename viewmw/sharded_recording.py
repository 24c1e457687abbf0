"""Recording views on a Redis Cluster: one ``record_views`` call per content shard.

A batch of views (one event-loop turn's) is split by content shard: every key one call touches
is in its shard's slot (docs/keys.md, *Redis Cluster*). With the daily limit on, each view first
reserves its place in its viewer's quota (:mod:`viewmw.daily_quota`), the shards' calls then
decide the views with those answers, and the places of views a content rule blocked are given
back after the replies have gone to their requests.

A shard whose node fails fails only its own views: each view's reply is its own, so a view
counted on a healthy node is never sent to the outage path (where a replay would count it again).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from viewmw.daily_quota import DailyQuota, QuotaClaim, Reservation
from viewmw.failures import never_ran
from viewmw.keys import KeySchema
from viewmw.pipeline import Early
from viewmw.scripts import ScriptRunner, Scripts, run_on_client
from viewmw.shards import ContentShards

logger = logging.getLogger("viewmw")

ViewCall = tuple[tuple[str, ...], tuple[Any, ...], str | None]
"""One view in a ``record_views`` call: its ten keys, its fourteen arguments and its replay
marker, as the tracker builds them (see :mod:`viewmw.tracker`). On a cluster its daily counter's
place holds a key of its slot and its last argument (the quota) is filled here."""

# Positions in a view's record_views arguments (see record_views.lua).
_DAILY_TTL, _MEMBER, _DAY, _VIEWER, _CRAWLER = 4, 5, 7, 9, 10
# Reason codes of views a content rule blocked (cooldown, viewed today, session limit).
_CONTENT_RULES = frozenset({1, 2, 3})


class ShardedRecording:
    """Sends batches of views to a Redis Cluster, a call per content shard, concurrently.

    Args:
        redis: a ``redis.asyncio.cluster.RedisCluster`` client (with retries off: a script that
            timed out may have run).
        scripts: the scripts registered on ``redis``.
        shards: the deployment's content shards.
        limit_args: the arguments every ``record_views`` call starts with.
        daily_limit: views per viewer per day, or ``None`` when the daily limit is off.
        run: how a script call is sent (through ``redis`` unless given: a
            :class:`~viewmw.node_connections.NodeConnections`' ``run_script`` pipelines each
            node's calls on one lean connection).
    """

    def __init__(
        self,
        redis: Any,
        scripts: Scripts,
        shards: ContentShards,
        limit_args: Sequence[Any],
        daily_limit: int | None,
        run: ScriptRunner = run_on_client,
    ) -> None:
        self.scripts = scripts
        self.shards = shards
        self.limit_args = list(limit_args)
        self.daily_limit = daily_limit
        self.run = run
        self.quota = DailyQuota(redis, shards.schemas[0], scripts, run) if daily_limit else None
        self._releases: set[asyncio.Task[None]] = set()

    async def send(
        self,
        calls: list[ViewCall],
        parse: Callable[[Any, int], list[Any]],
        early: Early | None = None,
    ) -> list[Any]:
        """Decide ``calls``; per view, its parsed reply, or the exception its shard's call (or
        its reservation) raised. ``parse`` splits one call's reply into a reply per view.

        ``early`` gets each shard's replies (and the failed reservations) as soon as they are
        known: the views of a healthy shard need not wait for a slow node's ``record_views``
        call. The daily places of the whole batch are reserved first, so a slow viewer shard
        still holds back the batch."""
        replies: list[Any] = [None] * len(calls)
        claims: list[QuotaClaim | None] = [None] * len(calls)
        answers: list[Reservation | None] = [None] * len(calls)
        if self.quota is not None:
            claims, reserved = await self._reserve(calls)
            for position, answer in enumerate(reserved):
                if isinstance(answer, Exception):  # not decided: the view takes the outage path
                    replies[position] = answer
                else:
                    answers[position] = answer
            failed = [position for position, reply in enumerate(replies) if reply is not None]
            if failed:
                _hand_over(early, failed, [replies[position] for position in failed])
        groups: dict[int, list[int]] = {}
        for position, (_, view_args, _) in enumerate(calls):
            if replies[position] is None:
                shard = self.shards.index(*KeySchema.split_member(view_args[_MEMBER]))
                groups.setdefault(shard, []).append(position)

        async def decide(shard: int, positions: list[int]) -> None:
            try:
                outcome = await self._decide(shard, calls, positions, answers)
            except Exception as exc:
                outcome = exc
            shard_replies = _per_view(outcome, parse, positions)
            for position, reply in zip(positions, shard_replies, strict=True):
                replies[position] = reply
            _hand_over(early, positions, shard_replies)

        # One shard's call cancelled on its own does not stop the others: the batch ends with
        # the cancellation once they have ended (a cancelled batch cancels them all).
        outcomes = await asyncio.gather(
            *(decide(shard, positions) for shard, positions in groups.items()),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self._release_unused(claims, answers, replies)
        return replies

    async def _reserve(
        self, calls: list[ViewCall]
    ) -> tuple[list[QuotaClaim | None], list[Reservation | Exception | None]]:
        """Reserve the daily place of every viewer's view (crawler views have none); per view,
        its answer or the error of its viewer shard's call."""
        assert self.quota is not None and self.daily_limit is not None
        claims: list[QuotaClaim | None] = []
        for _, view_args, marker in calls:
            if view_args[_CRAWLER]:
                claims.append(None)
                continue
            # A replayed view is known by its marker, so its replays share one place.
            view_id = marker if marker is not None else uuid.uuid4().hex
            ttl = int(view_args[_DAILY_TTL])
            claims.append(QuotaClaim(view_args[_VIEWER], view_args[_DAY], view_id, ttl))
        wanted = [claim for claim in claims if claim is not None]
        reserved = iter(await self.quota.reserve_each(wanted, self.daily_limit) if wanted else [])
        answers = [None if claim is None else next(reserved) for claim in claims]
        return claims, answers

    async def _decide(
        self,
        shard: int,
        calls: list[ViewCall],
        positions: list[int],
        answers: list[Reservation | None],
    ) -> Any:
        """One ``record_views`` call for the views of one shard."""
        keys = self.shards.schemas[shard]
        call_keys: list[str] = [keys.dirty, keys.epoch, keys.sync_batch]
        args: list[Any] = list(self.limit_args)
        markers: list[str] = []
        for position in positions:
            view_keys, view_args, marker = calls[position]
            call_keys += view_keys
            answer = answers[position]
            quota = "" if answer is None else "r" if answer is Reservation.RESERVED else "f"
            args += (*view_args[:-1], quota)
            if marker is not None:
                markers.append(marker)
        return await self.run(self.scripts.record_views, call_keys + markers, args)

    def _release_unused(
        self,
        claims: list[QuotaClaim | None],
        answers: list[Reservation | None],
        replies: list[Any],
    ) -> None:
        """Give back, without making anyone wait, the places of views a content rule blocked,
        and of views whose decision Redis never ran (they go to the outbox, and their replay
        reserves a place of its own)."""
        if self.quota is None:
            return
        blocked = [
            claim
            for claim, answer, reply in zip(claims, answers, replies, strict=True)
            if claim is not None
            and answer is Reservation.RESERVED
            and (
                never_ran(reply) if isinstance(reply, BaseException) else reply[1] in _CONTENT_RULES
            )
        ]
        if blocked:
            task = asyncio.get_running_loop().create_task(self._release(blocked))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, claims: list[QuotaClaim]) -> None:
        assert self.quota is not None
        try:
            await self.quota.release(claims)
        except Exception:  # the places stay taken: the limit errs on the strict side
            logger.warning("giving back %d daily places failed", len(claims), exc_info=True)

    async def drain(self) -> None:
        """Wait until every release started so far has ended."""
        while self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


def _hand_over(early: Early | None, positions: list[int], replies: list[Any]) -> None:
    """Give ``replies`` to their requests now; should that fail, they get them when the batch
    ends (nothing of the batch's own work is skipped)."""
    if early is None:
        return
    try:
        early(positions, replies)
    except Exception:
        logger.exception("handing %d replies over early failed", len(replies))


def _per_view(
    outcome: Any, parse: Callable[[Any, int], list[Any]], positions: list[int]
) -> list[Any]:
    """One shard call's outcome as a reply per view: its error, shared, when the call failed
    or its reply could not be read (none of its views is known to be counted)."""
    if isinstance(outcome, Exception):
        return [outcome] * len(positions)
    try:
        return parse(outcome, len(positions))
    except Exception as exc:
        return [exc] * len(positions)
