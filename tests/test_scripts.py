"""The Lua scripts as Redis receives them: shared helpers included, every script loadable."""

from __future__ import annotations

import re
from importlib import resources

import redis.asyncio as aioredis

from viewmw.scripts import Scripts, script_source

SHARED = resources.files("viewmw").joinpath("lua", "shared")


def test_every_include_is_filled_in_and_every_shared_helper_is_used() -> None:
    sources = {name: script_source(name) for name in Scripts.__slots__}
    for name, source in sources.items():
        assert not re.search(r"^-- include:", source, re.MULTILINE), name
    for helper in SHARED.iterdir():
        text = helper.read_text(encoding="utf-8").rstrip("\n")
        assert any(text in source for source in sources.values()), helper.name


async def test_every_script_loads_into_real_redis(real_redis: aioredis.Redis) -> None:
    for name in Scripts.__slots__:
        sha = await real_redis.script_load(script_source(name))
        assert (await real_redis.script_exists(sha)) == [True], name
