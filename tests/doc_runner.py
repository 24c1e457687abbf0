"""Runs one code example from the docs (read from stdin), as a reader would paste it.

Examples may use top-level ``await`` and the names a page introduces in its prose: ``app`` (a
Starlette app), ``tracker`` (a ViewTracker on the configured servers) and ``viewer``.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import sys

from starlette.applications import Starlette

from viewmw import Settings, Store, ViewTracker
from viewmw.assembly import connect_redis


async def namespace(settings: Settings) -> dict[str, object]:
    store = Store.from_settings(settings)
    await store.create_tables()
    return {
        "__name__": "__docs__",
        "app": Starlette(),
        "tracker": ViewTracker(connect_redis(settings), store, settings),
        "viewer": "user:42",
    }


def main(source: str) -> None:
    code = compile(source, "<docs example>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:  # top-level await: run it inside an event loop

        async def run() -> None:
            await eval(code, await namespace(Settings.from_env()))

        asyncio.run(run())
    else:  # plain code, which may start its own event loop
        exec(code, asyncio.run(namespace(Settings.from_env())))


if __name__ == "__main__":
    main(sys.stdin.read())
