"""Content shards: how viewmw's keys are spread over a Redis Cluster (docs/keys.md).

A single Redis is one shard with no hash tag, so every key keeps the name it always had. On a
cluster each content belongs to one of ``count`` shards, and every key about it (and the shard's
own dirty set, epoch, batch and rankings) carries the shard's tag ``{c:N}``: each rule decision
and each sync step stays one atomic script call in one slot.
"""

from __future__ import annotations

from viewmw.keys import KeySchema, content_shard

DEFAULT_CLUSTER_SHARDS = 128
"""Shards of a cluster when none is configured: spread evenly over a few primaries (docs/keys.md,
*How many shards*), and few enough that a call per shard stays cheap for a sync or a top-n read."""

MAX_CLUSTER_SHARDS = 16384
"""A cluster's hash slots: more shards could not spread any further."""


class ContentShards:
    """The key schema of every content shard, and which shard a content belongs to.

    Args:
        prefix: the key prefix of every key.
        count: the number of content shards on a cluster; ``None`` for a single Redis (one
            shard whose keys carry no tag).
    """

    def __init__(self, prefix: str = "", count: int | None = None) -> None:
        if count is not None and not 1 <= count <= MAX_CLUSTER_SHARDS:
            raise ValueError(f"a cluster has 1 to {MAX_CLUSTER_SHARDS} content shards, not {count}")
        self.count = count
        if count is None:
            self.schemas: tuple[KeySchema, ...] = (KeySchema(prefix),)
        else:
            self.schemas = tuple(KeySchema(prefix, n, count) for n in range(count))

    @property
    def clustered(self) -> bool:
        """Whether the keys are tagged for a cluster."""
        return self.count is not None

    def index(self, content_type: str, content_id: str) -> int:
        """The shard of one content (always 0 on a single Redis)."""
        if self.count is None:
            return 0
        return content_shard(content_type, content_id, self.count)

    def of(self, content_type: str, content_id: str) -> KeySchema:
        """The key schema of the shard that holds one content's keys."""
        return self.schemas[self.index(content_type, content_id)]
