"""Client CPU per request and a ranked profile of the request path, driven in-process.

``python -m bench.profile_request [bare|do-nothing|tracked|deferred] [--profile] [--redis-py]
[--concurrency N]``: 32 (or N) concurrent requests at a time through the middleware around a
plain ASGI app, on a private Redis-compatible server, no database (counts are Redis-only). CPU is
this process's (``time.process_time``), so the figure leaves out Redis' own work and is steady on
a busy machine. Views go to Redis on the dedicated script connection, as the middleware sends
them; ``--redis-py`` sends them through redis-py's pool instead, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from bench.redis_server import bench_redis_server
from viewmw import (
    ResilientTracker,
    Settings,
    TrackResult,
    ViewCount,
    ViewTracker,
    ViewTrackingMiddleware,
)
from viewmw.assembly import connect_redis
from viewmw.script_connection import ScriptConnection

REQUESTS = 20_000
CONCURRENCY = 32


async def _plain_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"a story"})


async def _drive(app: Any, scope: dict[str, Any]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


class _DoNothing:
    """A tracker that answers at once: what is left is the middleware's own cost."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = time.time

    async def track_valid_view(self, content_type: str, content_id: str, viewer: str) -> Any:
        return TrackResult(True, None, ViewCount(1, 0, 0))

    def offer_valid_view(self, content_type: str, content_id: str, viewer: str) -> int | None:
        return 1

    async def get_view_count_details(self, content_type: str, ids: Any) -> Any:
        return {i: ViewCount(1, 0, 0) for i in ids}


def _scopes() -> list[dict[str, Any]]:
    return [
        {
            "type": "http",
            "method": "GET",
            "path": f"/stories/{n % 1000}",
            "root_path": "",
            "headers": [(b"user-agent", f"Mozilla/5.0 profile-{n % 500}".encode())],
            "client": ("127.0.0.1", 40000 + n % 1000),
        }
        for n in range(REQUESTS)
    ]


async def _run(
    variant: str, url: str, profile: bool, redis_py: bool, concurrency: int = CONCURRENCY
) -> None:
    settings = Settings(redis_url=url, secret="profile-secret-0123456789")
    redis = connect_redis(settings)
    connection = None if redis_py else ScriptConnection.from_url(url)
    tracker: Any = ResilientTracker(
        ViewTracker(redis, None, settings, script_connection=connection)
    )
    if variant == "do-nothing":
        tracker = _DoNothing(settings)
    app: Any = _plain_app
    if variant != "bare":
        app = ViewTrackingMiddleware(
            _plain_app,
            tracker=tracker,
            routes={"/stories/{id:int}": "story"},
            deferred=variant == "deferred",
        )
    scopes = _scopes()

    async def worker(first: int) -> None:
        for n in range(first, REQUESTS, concurrency):
            await _drive(app, scopes[n])

    await asyncio.gather(*(worker(k) for k in range(concurrency)))  # warm: scripts, connections
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    print(f"{variant}: {cpu / REQUESTS * 1e6:.1f} µs of client CPU per request")
    if profiler:
        stats = pstats.Stats(profiler)
        print(f"{stats.total_calls / REQUESTS:.0f} function calls per request")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)
    if isinstance(tracker, ResilientTracker):
        await tracker.aclose()
    await redis.aclose()
    if connection is not None:
        await connection.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_request")
    parser.add_argument("variant", choices=["bare", "do-nothing", "tracked", "deferred"])
    parser.add_argument("--profile", action="store_true", help="print the cProfile ranking")
    parser.add_argument(
        "--redis-py", action="store_true", help="send views through redis-py, not the lean path"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help="requests at once, so also views per Redis call (under uvicorn, fewer than 32)",
    )
    args = parser.parse_args()
    with bench_redis_server() as server:
        url = server.connection_url
        asyncio.run(_run(args.variant, url, args.profile, args.redis_py, args.concurrency))


if __name__ == "__main__":
    main()
