"""Reads that touch many content shards: one call per shard, one pipeline per Redis node.

On a single Redis there is one shard, and a read is the one call it always was. On a Redis
Cluster a read of many contents (or of a whole content type) is one script call per content shard
it touches, each in its shard's slot (docs/keys.md, *What each read costs*). The calls travel in
one cluster pipeline, which redis-py splits per node and sends to the nodes concurrently: one
round trip per node, however many shards each serves.

A cluster pipeline refuses ``evalsha()`` and script objects, so the calls go as raw ``EVALSHA``
commands. A node that lost its scripts (restarted) answers ``NOSCRIPT``: the script is loaded on
every primary and only those calls are sent again, which is safe for any script, since a call
answered ``NOSCRIPT`` never ran. The sync claims its shards this way too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from viewmw.shards import ContentShards

ShardCall = tuple[Sequence[str], Sequence[Any]]
"""One script call: its keys (all in one slot) and its arguments."""


async def run_on_shards(redis: Any, script: AsyncScript, calls: Sequence[ShardCall]) -> list[Any]:
    """Run ``script`` once per call; the replies, in order. A lone call is the script's own
    (``EVALSHA``, loaded on ``NOSCRIPT`` by redis-py); more share one pipeline.

    Raises:
        redis.RedisError: the first call that failed (a read is answered whole or not at all).
    """
    if not calls:
        return []
    if len(calls) == 1:
        keys, args = calls[0]
        return [await script(keys=keys, args=args)]
    replies = await _pipelined(redis, script.sha, calls)
    missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        # SCRIPT LOAD goes to every primary of a cluster (redis-py's routing for it).
        script.sha = await redis.script_load(script.script)
        again = await _pipelined(redis, script.sha, [calls[n] for n in missing])
        for n, reply in zip(missing, again, strict=True):
            replies[n] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _pipelined(redis: Any, sha: str, calls: Sequence[ShardCall]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


async def get_each(redis: Any, keys: Sequence[str]) -> list[Any]:
    """``GET`` of each key (of any slots): one command alone, else one pipeline (per node)."""
    if len(keys) == 1:
        return [await redis.get(keys[0])]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
        return list(await pipe.execute())


def group_by_shard(
    shards: ContentShards, content_type: str, ids: Sequence[str]
) -> dict[int, list[str]]:
    """``ids`` of one type grouped by content shard, shards in order of first appearance and
    each group in the order given (one group, shard 0, on a single Redis)."""
    groups: dict[int, list[str]] = {}
    for content_id in ids:
        groups.setdefault(shards.index(content_type, content_id), []).append(content_id)
    return groups
