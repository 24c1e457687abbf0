"""The Lua scripts in ``viewmw/lua/``, read once per process and registered per Redis client.

redis-py's script objects run ``EVALSHA`` and reload the script transparently when Redis answers
``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``); in a pipeline they load it before sending.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

# A script line ``-- include: name`` is replaced by ``viewmw/lua/shared/name.lua``: Lua helpers
# that several scripts need are written once.
_INCLUDE = re.compile(r"^-- include: ([a-z_]+)$", re.MULTILINE)


def _lua_file(*parts: str) -> str:
    return resources.files("viewmw").joinpath("lua", *parts).read_text(encoding="utf-8")


@cache
def script_source(name: str) -> str:
    """The text of ``viewmw/lua/{name}.lua``, its includes filled in."""
    return _INCLUDE.sub(
        lambda include: _lua_file("shared", f"{include[1]}.lua").rstrip("\n"),
        _lua_file(f"{name}.lua"),
    )


ScriptRunner = Callable[[AsyncScript, Sequence[Any], Sequence[Any]], Awaitable[Any]]
"""Runs one script call: ``(script, keys, args) -> reply``. :func:`run_on_client` sends it through
the client the script is registered on; a lean connection's ``run_script`` is another."""


async def run_on_client(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """``EVALSHA`` of ``script`` through the client it is registered on."""
    return await script(keys=keys, args=args)


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script, registered on one client."""

    record_views: AsyncScript
    read_counts: AsyncScript
    fill_cache: AsyncScript
    take_lock: AsyncScript
    raise_fence: AsyncScript
    open_batch: AsyncScript
    snapshot: AsyncScript
    seal: AsyncScript
    read_batch: AsyncScript
    drop_batch: AsyncScript
    settle: AsyncScript
    release_lock: AsyncScript
    renew_lock: AsyncScript
    read_days: AsyncScript
    count_viewers: AsyncScript
    read_ranking: AsyncScript
    read_viewers: AsyncScript
    reserve_daily: AsyncScript
    release_daily: AsyncScript
    take_dirty: AsyncScript
    claim_shard: AsyncScript
    restore_daily: AsyncScript
    restore_sessions: AsyncScript

    @classmethod
    def register(cls, client: Any) -> Scripts:
        """Register every script on ``client`` (a ``redis.asyncio`` client)."""
        return cls(**{name: client.register_script(script_source(name)) for name in cls.__slots__})
