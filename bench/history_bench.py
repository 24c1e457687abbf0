"""The per-day history's costs: the recording script's Redis CPU with and without unique
viewers, a HyperLogLog's memory per content per day, and period reads on a large history.

Run alone with ``python -m bench.history_bench`` (a private Redis, the bench PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import redis.asyncio as aioredis
from sqlalchemy import text

from bench.servers import bench_settings, drop_private_database, fresh_store, private_redis
from bench.sync_bench import _fill_pending
from viewmw import Limits, Period, Store, ViewStats, ViewSync, ViewTracker
from viewmw.history_sql import HistoryReader

BATCH = 100  # views per record_views call, as a busy event loop turn sends them
CPU_ROUNDS = 9  # samples each way: the ratio is a few per cent, the noise of one sample as much
READ_SAMPLES = 21  # per read: a few ms each, on a shared machine


@dataclass
class HistoryFigures:
    """What one run measured."""

    cpu_us_per_view: dict[bool, list[float]] = field(default_factory=dict)
    hll_bytes: dict[int, int] = field(default_factory=dict)
    read_ms: dict[str, float] = field(default_factory=dict)
    contents: int = 0
    days: int = 0

    @property
    def hll_overhead(self) -> float:
        """Median Redis CPU per view with unique viewers on, over off (1.0 = no cost)."""
        return statistics.median(self.cpu_us_per_view[True]) / statistics.median(
            self.cpu_us_per_view[False]
        )


async def _script_cpu_us(redis: aioredis.Redis) -> float:
    """The server's CPU time so far (user + system, µs): CPU it used, not time it waited for a
    core, which on a shared machine inflates ``INFO commandstats``."""
    cpu = await redis.info("cpu")
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6


async def _cpu_per_view(redis: aioredis.Redis, uniques: bool, views: int, round_: int) -> float:
    """Redis' CPU (µs, from INFO cpu) per view of the recording script."""
    settings = bench_settings().replace(
        unique_viewers=uniques, limits=Limits(max_views_per_session=None)
    )
    tracker = ViewTracker(redis, None, settings, pipelining=False)
    calls = [
        [
            tracker._view_call("story", str(n % 5000), f"user:{round_}x{n}", time.time())
            for n in range(start, start + BATCH)
        ]
        for start in range(0, views, BATCH)
    ]
    before = await _script_cpu_us(redis)
    for batch in calls:
        await tracker._send_views(batch)
    return (await _script_cpu_us(redis) - before) / views


async def _hll_memory(redis: aioredis.Redis) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for viewers in (1, 10, 100, 1_000, 10_000):
        key = f"bench:uniq:{viewers}"
        for start in range(0, viewers, 1000):
            await redis.pfadd(key, *(f"user:{n}" for n in range(start, min(viewers, start + 1000))))
        sizes[viewers] = int(await redis.memory_usage(key) or 0)
        await redis.delete(key)
    return sizes


# Every content has a row every day. Popularity follows a Zipf-like law of the content's rank
# (as page views do), with day-to-day noise of -30 % to +30 %. The rows go in a day at a time,
# oldest day first, as the daily syncs write them: one content's days sit on as many heap pages,
# not side by side (written content by content, a read of its period found them on one or two
# pages, which no production history does). Every view is a new viewer, and
# each day keeps its estimate and a sketch, as the sync writes them with unique viewers on: the
# sketch is a real HyperLogLog of the largest of SKETCH_VIEWERS not above the day's views (so
# that Redis can merge it), as large as the day's own would be.
SKETCH_VIEWERS = (1, 3, 10, 30, 100, 300, 1000, 3000)
_FILL = text(
    "INSERT INTO viewmw_daily_views "
    "(content_type, content_id, day, views, crawler_views, unique_viewers, unique_sketch) "
    "SELECT 'story', c::text, CAST(:today AS date) - d, v, 0, v, "
    "CASE "
    + " ".join(
        f"WHEN v >= {viewers} THEN CAST(:sketch_{viewers} AS bytea)"
        for viewers in reversed(SKETCH_VIEWERS)
    )
    + " END FROM (SELECT c, d, "
    "GREATEST(1, floor(20000 / power(c, 0.8) * (0.7 + ((c * 31 + d * 17) % 61) / 100.0)))::bigint"
    " AS v FROM generate_series(0, :days - 1) d, generate_series(1, :contents) c) AS days"
    " ORDER BY d DESC, c"
)


async def _sketches(redis: aioredis.Redis) -> dict[str, bytes]:
    """A real HyperLogLog (its ``GET`` form) of each of SKETCH_VIEWERS viewers."""
    sketches: dict[str, bytes] = {}
    for viewers in SKETCH_VIEWERS:
        key = f"bench:sketch:{viewers}"
        await redis.pfadd(key, *(f"user:{n}" for n in range(viewers)))
        sketch = await redis.get(key)
        assert isinstance(sketch, bytes), "the bench's client returns raw bytes"
        sketches[f"sketch_{viewers}"] = sketch
        await redis.delete(key)
    return sketches


WRITTEN_DAYS = 5
# What each sync does to the rows of the day: their views go up (a new version of each row).
_REWRITE = text("UPDATE viewmw_daily_views SET views = views + 1 WHERE day >= :first")


async def _time_reads(
    cases: dict[str, Callable[[], Awaitable[object]]], figures: HistoryFigures
) -> None:
    """The median time of each read (after one to warm caches and prepared plans)."""
    for name, read in cases.items():
        await read()
        times = []
        for _ in range(READ_SAMPLES):
            started = time.perf_counter()
            await read()
            times.append((time.perf_counter() - started) * 1000)
        figures.read_ms[name] = statistics.median(times)


async def _first_of_epoch(redis: aioredis.Redis, stats: ViewStats, ids: list[str]) -> object:
    await redis.incr(stats.keys.epoch)
    return await stats.views_many("story", ids, Period.last_days(30))


async def _reads(redis: aioredis.Redis, contents: int, days: int, figures: HistoryFigures) -> None:
    store = await fresh_store()
    try:
        settings = bench_settings()
        tracker = ViewTracker(redis, store, settings)
        today = ViewStats.from_tracker(tracker).today()
        async with store.engine.begin() as connection:
            await connection.execute(
                _FILL,
                {"today": today, "contents": contents, "days": days, **await _sketches(redis)},
            )
        async with store.engine.connect() as connection:  # what autovacuum does in production
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE viewmw_daily_views"))
        # Some views of today still pending in Redis, as between two syncs.
        await asyncio.gather(*(tracker.track_view("story", n, f"user:{n}") for n in range(1, 2001)))
        stats = ViewStats.from_tracker(tracker)
        no_uniques = ViewStats(
            redis, store, settings.replace(unique_viewers=False), clock=tracker.clock
        )
        ids = [str(n) for n in range(1, contents, contents // 100)][:100]
        history = HistoryReader(store.engine)
        first = today - timedelta(days=29)
        oldest_live = today - timedelta(days=settings.history_retention_days)
        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "top(limit=10), 7 days": lambda: stats.top("story", Period.last_days(7), 10),
            "top(limit=10), 30 days": lambda: stats.top("story", Period.last_days(30), 10),
            "views_many(100 ids), 30 days": lambda: stats.views_many(
                "story", ids, Period.last_days(30)
            ),
            "views_many(100 ids), 30 days, unique viewers off": lambda: no_uniques.views_many(
                "story", ids, Period.last_days(30)
            ),
            # As the first read after a sync: a new epoch, no merged kept sketch (one INCR more).
            "views_many(100 ids), 30 days, first read of an epoch": lambda: _first_of_epoch(
                redis, stats, ids
            ),
            "by_day(1 id), 30 days": lambda: stats.by_day("story", 1, Period.last_days(30)),
            # The history's statement alone, as views_many makes it (the rest is Redis).
            "HistoryReader.totals(100 ids), 30 days": lambda: history.totals(
                "story", ids, first, today, sketches_before=oldest_live
            ),
            "HistoryReader.totals(100 ids), 30 days, no sketches": lambda: history.totals(
                "story", ids, first, today, sketches_before=None
            ),
        }
        await _time_reads(cases, figures)
        # The days the sync wrote since the last vacuum: their pages are not all-visible, so an
        # index-only scan reads the heap for their rows. Autovacuum starts on a table once a
        # fifth of its rows changed: 5 of 30 days rewritten stays below that.
        async with store.engine.begin() as connection:
            await connection.execute(_REWRITE, {"first": today - timedelta(days=WRITTEN_DAYS - 1)})
        written = f", {WRITTEN_DAYS} days written since the last vacuum"
        await _time_reads(
            {
                name + written: cases[name]
                for name in (
                    "views_many(100 ids), 30 days",
                    "views_many(100 ids), 30 days, unique viewers off",
                    "HistoryReader.totals(100 ids), 30 days, no sketches",
                )
            },
            figures,
        )
    finally:
        await store.close()


async def run_history_bench(contents: int, days: int, views: int) -> HistoryFigures:
    figures = HistoryFigures(cpu_us_per_view={True: [], False: []}, contents=contents, days=days)
    async with private_redis() as (redis, _):
        for round_ in range(CPU_ROUNDS):  # side by side, alternating, so drift hits both alike
            # Each sample starts from an empty database, and each side goes first in turn: a
            # sample run on the keys the other left grows a larger keyspace (slower).
            for uniques in (False, True) if round_ % 2 == 0 else (True, False):
                await redis.flushdb()
                figures.cpu_us_per_view[uniques].append(
                    await _cpu_per_view(redis, uniques, views, round_ * 2 + uniques)
                )
        await redis.flushdb()
        figures.hll_bytes = await _hll_memory(redis)
        await _reads(redis, contents, days, figures)
    return figures


def render(figures: HistoryFigures) -> str:
    """The figures as a section of docs/performance.md."""
    off = statistics.median(figures.cpu_us_per_view[False])
    on = statistics.median(figures.cpu_us_per_view[True])
    lines = [
        "## Views over time (per-day history)",
        "",
        f"- Recording script, Redis CPU per view (`INFO cpu`, median of {CPU_ROUNDS} alternating "
        "samples, each from an empty database, "
        f"{BATCH} views per call): unique viewers off {off:.1f} µs, on {on:.1f} µs: "
        f"**{figures.hll_overhead:.2f}×**",
        "- HyperLogLog memory per content per day (`MEMORY USAGE`): "
        + ", ".join(f"{n:,} viewers {b:,} B" for n, b in figures.hll_bytes.items()),
        f"- Reads on {figures.contents:,} contents × {figures.days} days of history in "
        f"PostgreSQL, 2 000 views pending today (median of {READ_SAMPLES}):",
    ]
    lines += [f"  - {name}: {ms:.1f} ms" for name, ms in figures.read_ms.items()]
    lines += [
        "",
        "How these reads were measured and taken down, and what was tried and dropped:",
        "[measurements](measurements.md#history-reads).",
    ]
    return "\n".join(lines)


_TICKS = os.sysconf("SC_CLK_TCK")
READ_AND_COMMIT = "read and commit (sealed -> committed)"


async def _database_cpu(store: Store) -> float:
    """CPU seconds used so far by the PostgreSQL backends of the store's database (read from
    /proc: the bench's server runs on this machine; 0 where it cannot be read)."""
    async with store.engine.connect() as connection:
        pids = (
            await connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
        ).scalars()
        return sum(_process_cpu(pid) for pid in pids)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process of this machine; 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


async def time_sync_steps(counters: int) -> dict[str, tuple[float, float, float, float]]:
    """Per pair of step boundaries of a sync of ``counters`` pending counters (each with its
    day), summed: (wall seconds, CPU seconds of the Redis server, of this process, of the
    PostgreSQL backends).

    The CPU figures hold on a busy machine, where wall time also counts waiting for a core.
    """
    spent: dict[str, tuple[float, float, float, float]] = {}
    async with private_redis() as (redis, _):
        store = await fresh_store(rows=counters)
        try:
            await _fill_pending(redis, counters)

            async def gauges() -> tuple[float, float, float, float]:
                return (
                    time.perf_counter(),
                    await _script_cpu_us(redis) / 1e6,
                    time.process_time(),
                    await _database_cpu(store),
                )

            mark = [await gauges()]
            previous = ["start"]
            # From "sealed" to "committed" (the batch's read and its transaction) also summed
            # as one: the history rows are made while the transaction runs, so the steps in
            # between ("before_commit", "history") split that time where the hooks happen to run.
            window = [False]

            def add(key: str, now: tuple[float, float, float, float]) -> None:
                summed = spent.get(key, (0.0, 0.0, 0.0, 0.0))
                spent[key] = (
                    summed[0] + now[0] - mark[0][0],
                    summed[1] + now[1] - mark[0][1],
                    summed[2] + now[2] - mark[0][2],
                    summed[3] + now[3] - mark[0][3],
                )

            async def step(name: str) -> None:
                now = await gauges()
                add(f"{previous[0]} -> {name}", now)
                if window[0]:
                    add(READ_AND_COMMIT, now)
                window[0] = name != "committed" and (window[0] or name == "sealed")
                # The gauges' own reads are not the sync's: the next step starts after them.
                mark[0] = await gauges()
                previous[0] = name

            await ViewSync(redis, store, on_step=step).run()
            await step("end")
            steps = [figures for key, figures in spent.items() if key != READ_AND_COMMIT]
            spent["total"] = (
                sum(wall for wall, _, _, _ in steps),
                sum(server for _, server, _, _ in steps),
                sum(process for _, _, process, _ in steps),
                sum(database for _, _, _, database in steps),
            )
        finally:
            await store.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contents", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--views", type=int, default=20_000, help="views per CPU sample")
    parser.add_argument(
        "--sync", type=int, metavar="N", help="only time a sync of N counters, step by step"
    )
    args = parser.parse_args()
    try:
        if args.sync:
            print("steps: wall s; CPU s of Redis, of the sync's process, of PostgreSQL")
            for name, figures in asyncio.run(time_sync_steps(args.sync)).items():
                print(f"{name}: " + ", ".join(f"{seconds:.1f}" for seconds in figures))
            return
        print(render(asyncio.run(run_history_bench(args.contents, args.days, args.views))))
    finally:
        asyncio.run(drop_private_database())


if __name__ == "__main__":
    main()
