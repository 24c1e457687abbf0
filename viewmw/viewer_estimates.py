"""Distinct viewers of (content, days) groups, estimated in Redis: each group's live
HyperLogLogs and the sketches the history kept, merged by one PFCOUNT (``count_viewers.lua``).

A group over a whole period may use its kept days' sketches merged into one HyperLogLog that an
earlier read of the same sync epoch left in Redis (:meth:`KeySchema.merged_sketch`): a list page
read again between two syncs reads no sketch from the database and sends none to Redis. A group
that comes with its sketches leaves its merged sketch for the next reads; one whose merged
sketch expired since the read found it is answered by a second call, with its sketches. A sync
moves the epoch before it writes the history, so a merged sketch never answers for a history it
does not hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from viewmw.scripts import Scripts
from viewmw.shard_reads import ShardCall, run_on_shards
from viewmw.shards import ContentShards

MERGED_SKETCH_MS = 600_000
"""How long a merged sketch serves reads, at most: the next sync's epoch retires it sooner."""

# What count_viewers does with a group's merged sketch: none, use it, or make it.
_NONE, _USE, _MAKE = "0", "1", "2"


@dataclass(slots=True)
class ViewerGroup:
    """One (content, days) group of a read, as ``count_viewers`` takes it."""

    position: int
    """The group's place among the read's groups."""
    content_id: str
    first_live: int
    """Its first live day, as a 1-based place among the read's live days."""
    live: int
    """How many live days it has."""
    floor: int
    """The largest estimate of one of its days: the group has at least as many viewers."""
    kept: list[bytes] | None = field(default_factory=list)
    """The sketches the history kept of its days (``None``: its merged sketch holds them)."""
    merged: str | None = None
    """The key of its kept days' merged sketch, when it may use one: made from ``kept``, or
    used as it is when ``kept`` is ``None``."""

    @property
    def mode(self) -> str:
        if self.merged is None:
            return _NONE
        return _USE if self.kept is None else _MAKE

    @property
    def sketches(self) -> list[bytes]:
        return self.kept or []


FetchSketches = Callable[[list[str]], Awaitable[dict[str, list[bytes]]]]
"""The history's kept sketches of each of the ids given (in the read's period)."""


@dataclass(frozen=True, slots=True)
class ViewerEstimates:
    """Estimates the groups of one read, on a single Redis or a cluster's content shards."""

    redis: Any
    scripts: Scripts
    shards: ContentShards

    async def estimate(
        self,
        content_type: str,
        live_days: list[str],
        by_shard: dict[int, list[ViewerGroup]],
        epochs: dict[int, int],
        fetch: FetchSketches,
    ) -> tuple[dict[int, int], dict[int, int]]:
        """The sync epoch of each shard as the estimates saw it, and each group's estimate by
        its position. ``epochs`` are those the read saw first: the merged sketches' names carry
        them, and a reply of another epoch is a read to do again (the caller's check)."""
        estimates: dict[int, int] = {}
        current = await self._count(content_type, live_days, by_shard, epochs, estimates)
        missing = {
            shard: [group for group in groups if group.position not in estimates]
            for shard, groups in by_shard.items()
        }
        missing = {shard: groups for shard, groups in missing.items() if groups}
        if not missing or current != epochs:
            return current, estimates
        ids = [group.content_id for groups in missing.values() for group in groups]
        sketches = await fetch(ids)
        for groups in missing.values():
            for group in groups:
                group.kept = sketches.get(group.content_id, [])
        current |= await self._count(content_type, live_days, missing, epochs, estimates)
        return current, estimates

    async def _count(
        self,
        content_type: str,
        live_days: list[str],
        by_shard: dict[int, list[ViewerGroup]],
        epochs: dict[int, int],
        estimates: dict[int, int],
    ) -> dict[int, int]:
        """One ``count_viewers`` call per shard; fills ``estimates`` (a group whose merged
        sketch is not there yet is left out) and returns each shard's epoch."""
        token = uuid.uuid4().hex
        calls: list[ShardCall] = []
        for shard, groups in by_shard.items():
            keys = self.shards.schemas[shard]
            # Scratch keys are shared by a shard's groups: as many as one group has sketches.
            scratch = max((len(group.sketches) for group in groups), default=0)
            args: list[Any] = [
                keys.uniques_template,
                content_type,
                len(live_days),
                len(groups),
                epochs.get(shard, ""),
                MERGED_SKETCH_MS,
                *live_days,
            ]
            for group in groups:
                args += (group.content_id, group.first_live, group.live, len(group.sketches))
                args.append(group.mode)
            for group in groups:
                args += group.sketches
            calls.append(
                (
                    [
                        keys.epoch,
                        *(group.merged for group in groups if group.merged is not None),
                        *(keys.scratch(f"{token}:{n}") for n in range(scratch)),
                    ],
                    args,
                )
            )
        replies = await run_on_shards(self.redis, self.scripts.count_viewers, calls)
        for groups, reply in zip(by_shard.values(), replies, strict=True):
            for group, estimate in zip(groups, reply[1:], strict=True):
                if int(estimate) >= 0:
                    estimates[group.position] = max(int(estimate), group.floor)
        return {shard: int(reply[0]) for shard, reply in zip(by_shard, replies, strict=True)}
