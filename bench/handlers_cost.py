"""What the request-facing API adds to a tracked request that never calls ``track()``.

``python -m bench.handlers_cost``: the middleware's per-request work for ``viewmw.handlers`` (one
:class:`~viewmw.RequestView`, its place in the scope and on ``request.state``, and deciding
through it at the response start) against deciding directly, side by side in one process, on a
stand-in decision that answers at once. CPU time from ``time.process_time``, best of five rounds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from viewmw.handlers import SCOPE_KEY, RequestView
from viewmw.routes import RouteMatch

ROUNDS = 5
REQUESTS = 200_000


class _Decider:
    """Stands in for the middleware's decision: answers at once."""

    errors = None

    async def _outcome(
        self, scope: Any, match: RouteMatch, *, wait: bool = False
    ) -> tuple[int | None, bytes]:
        return 1, b"1"


async def _direct(decider: _Decider, match: RouteMatch) -> None:
    for _ in range(REQUESTS):
        scope: dict[str, Any] = {}
        await decider._outcome(scope, match)


async def _through_the_view(decider: _Decider, match: RouteMatch) -> None:
    middleware: Any = decider
    for _ in range(REQUESTS):
        scope: dict[str, Any] = {}
        view = RequestView(middleware, match)
        scope[SCOPE_KEY] = scope.setdefault("state", {})[SCOPE_KEY] = view
        await view.decide(scope, counts=True)


def _best(run: Callable[[_Decider, RouteMatch], Coroutine[Any, Any, None]]) -> float:
    """Nanoseconds of CPU per request, best of the rounds."""
    decider, match = _Decider(), RouteMatch("story", "1", "/stories/{id:int}")
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        asyncio.run(run(decider, match))
        best = min(best, time.process_time() - started)
    return best / REQUESTS * 1e9


def main() -> None:
    direct = _best(_direct)
    through = _best(_through_the_view)
    print(f"deciding directly: {direct:.0f} ns; through a RequestView: {through:.0f} ns")
    print(f"added per tracked request that never calls track(): {through - direct:.0f} ns")


if __name__ == "__main__":
    main()
