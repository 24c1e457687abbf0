"""Commands packed by hiredis reach Redis exactly as redis-py's own packer would send them."""

from __future__ import annotations

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from tests.support import REDIS_URL
from viewmw.packing import HiredisConnection, HiredisUnixConnection, connection_class_for

values = st.one_of(
    st.text(max_size=40), st.binary(max_size=40), st.integers(), st.floats(allow_nan=False)
)


@given(
    st.text(min_size=1, max_size=12).filter(lambda s: " " not in s), st.lists(values, max_size=20)
)
def test_bytes_on_the_wire_are_the_same(command: str, args: list[object]) -> None:
    ours = b"".join(HiredisConnection().pack_command(command, *args))
    theirs = b"".join(Connection().pack_command(command, *args))
    assert ours == theirs


def test_multi_word_commands_are_split_like_redis_py_does() -> None:
    ours = b"".join(HiredisConnection().pack_command("SCRIPT LOAD", "return 1"))
    assert ours == b"".join(Connection().pack_command("SCRIPT LOAD", "return 1"))


def test_the_class_follows_the_url_scheme() -> None:
    assert connection_class_for("redis://h:6379/0") is HiredisConnection
    assert connection_class_for("unix:///run/redis.sock") is HiredisUnixConnection
    assert connection_class_for("rediss://h:6380/0") is None  # TLS keeps redis-py's class


async def test_a_real_server_understands_it(real_redis: aioredis.Redis) -> None:
    client = aioredis.Redis.from_url(REDIS_URL, connection_class=HiredisConnection)
    try:
        sha = await client.script_load("return {KEYS[1], ARGV[1]}")
        assert await client.evalsha(sha, 1, "k", "é") == [b"k", "é".encode()]
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("a", 1.5).incr("n").get("a")
            assert await pipe.execute() == [True, 1, b"1.5"]
    finally:
        await client.aclose()
