"""The ``viewmw`` command: sync by hand, show statistics, create tables, clean up, and ask the
per-day history (``top``, ``views``).

Settings come from the same ``VIEWMW_*`` variables as the app and the worker. Exit codes: 0 done,
1 the operation failed (nothing is lost; run it again; a sync whose lock expired under it ends
here too; ``health`` when unhealthy), 2 bad configuration or a server is not reachable (a sync
that left a content type's views pending because it would move them elsewhere than the app reads
them ends here too), 75 another sync is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisClusterException, RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from viewmw import __version__
from viewmw.cli_history import add_history_parsers, top_command, views_command
from viewmw.cli_migrate import add_migrate_parser, migrate_command
from viewmw.connections import check_database, check_redis, redacted, redis_for_background
from viewmw.errors import ConfigurationError, ServiceUnavailableError, ViewmwError
from viewmw.health import HealthThresholds, check_health
from viewmw.operator_stats import operator_stats
from viewmw.outage.replayer import replay_outbox
from viewmw.settings import ENVIRONMENT, Settings
from viewmw.store import Store, UnmatchedViews
from viewmw.sync import SyncReport, ViewSync
from viewmw.tracker import ViewTracker

EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_BUSY = 0, 1, 2, 75


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="viewmw",
        description="Operate viewmw: sync view counts, statistics, health, tables.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"viewmw {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="move pending views into the database now")
    sync.add_argument(
        "--force", action="store_true", help="run recovery and cleanup even if nothing is pending"
    )
    sync.add_argument(
        "--stats", action="store_true", help="show abuse statistics and the last syncs; no sync"
    )
    sync.add_argument(
        "--enqueue", action="store_true", help="send the sync to the worker queue instead"
    )
    sync.add_argument("--json", action="store_true", help="with --stats: print JSON")
    stats = commands.add_parser("stats", help="the same as `sync --stats`")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_health_parser(commands)
    commands.add_parser("cleanup", help="delete previous days' daily counters")
    commands.add_parser("init-db", help="create viewmw's tables (and mapped content tables)")
    _add_unmatched_parser(commands)
    add_history_parsers(commands)
    add_migrate_parser(commands)
    return parser


def _environment_help() -> str:
    lines = ["settings (environment variables, read by the app, this command and the worker):"]
    lines += [f"  {variable.name:<34} {variable.help}" for variable in ENVIRONMENT]
    lines.append(
        "  the worker also reads VIEWMW_BROKER_URL, VIEWMW_SYNC_CRON, VIEWMW_CLEANUP_CRON, "
        "VIEWMW_FAILURE_HOOK, VIEWMW_RETRY_MIN_BACKOFF_MS, VIEWMW_SYNC_TIME_LIMIT_MS"
    )
    lines.append(
        "exit codes: 0 done (healthy), 1 failed (unhealthy), 2 bad configuration or a server "
        "is not reachable, 75 another sync is running"
    )
    return "\n".join(lines)


def _add_health_parser(commands: Any) -> None:
    defaults = HealthThresholds()
    health = commands.add_parser(
        "health", help="check Redis, the database, the backlog, the last sync, the outbox"
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health.add_argument(
        "--max-pending",
        type=int,
        default=defaults.max_pending_contents,
        metavar="N",
        help=f"pending contents above which it is unhealthy ({defaults.max_pending_contents})",
    )
    health.add_argument(
        "--max-sync-age",
        type=float,
        default=defaults.max_sync_age_seconds,
        metavar="SECONDS",
        help=f"last sync age above which it is unhealthy ({defaults.max_sync_age_seconds:.0f})",
    )
    health.add_argument(
        "--max-outbox",
        type=int,
        default=defaults.max_outbox_events,
        metavar="N",
        help=f"outbox events above which it is unhealthy ({defaults.max_outbox_events})",
    )


def _add_unmatched_parser(commands: Any) -> None:
    unmatched = commands.add_parser(
        "unmatched", help="list views the sync kept because their row did not exist"
    )
    unmatched.add_argument(
        "--retry", action="store_true", help="first add them to the rows that exist by now"
    )
    unmatched.add_argument("--json", action="store_true", help="print JSON instead of a table")
    unmatched.add_argument(
        "--limit", type=int, default=50, metavar="N", help="list at most N (default 50)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``viewmw`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # pika logs each refused connection with a traceback; the one-line message says it all.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    console = Console(soft_wrap=True)  # summaries stay on one line in logs; tables still fit
    errors = Console(stderr=True)
    try:
        settings = Settings.from_env()
        if args.command == "sync" and args.enqueue:
            return _enqueue(console)
        settings.resolved_database_url()  # a real Redis and no database URL: say what to set
        if args.command == "health":
            return asyncio.run(_health(settings, args, console))
        command = _COMMANDS["stats" if args.command == "sync" and args.stats else args.command]
        return asyncio.run(_with_services(settings, command, args, console))
    except (ConfigurationError, ServiceUnavailableError) as exc:
        errors.print(f"viewmw: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_UNAVAILABLE
    except (ViewmwError, RedisError, RedisClusterException, SQLAlchemyError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        errors.print(
            f"viewmw: {args.command} failed: {reason} (nothing is lost; run it again)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_FAILED


Command = Callable[[ViewTracker, ViewSync, argparse.Namespace, Console], Awaitable[int]]


async def _with_services(
    settings: Settings, command: Command, args: argparse.Namespace, console: Console
) -> int:
    redis = redis_for_background(settings)
    store = Store.from_settings(settings)
    try:
        await check_redis(redis, settings)
        await check_database(store)
        tracker = ViewTracker(redis, store, settings, pipelining=False)
        sync = ViewSync(redis, store, settings)
        return await command(tracker, sync, args, console)
    finally:
        await redis.aclose()
        await store.close()


async def _sync(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    # Views kept in the outbox during a Redis outage go through the rules first, then sync.
    replayed = await replay_outbox(tracker)
    if console.is_terminal:
        with Progress(
            TextColumn("syncing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("sync", total=None)
            report = await sync.run(
                force=args.force,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    else:
        report = await sync.run(force=args.force)
    if replayed.events:
        console.print(
            f"replayed {replayed.events} views kept during a Redis outage "
            f"({replayed.counted} counted)",
            markup=False,
            highlight=False,
        )
    if report.already_running:
        console.print("another sync is running; nothing done", markup=False)
        return EXIT_BUSY
    console.print(_summary(report), markup=False, highlight=False)
    if report.refused:
        errors = Console(stderr=True, soft_wrap=True)
        for message in report.refused.values():
            errors.print(f"viewmw: {message}", markup=False, highlight=False)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _summary(report: SyncReport) -> str:
    text = (
        f"synced {report.views} views of {report.contents} contents in {report.batches} "
        f"batches ({report.recovered_batches} recovered) in {report.duration:.2f}s"
    )
    if report.cleaned_keys:
        text += f"; removed {report.cleaned_keys} old tracking keys"
    if report.unmatched_views:
        text += (
            f"; {report.unmatched_views} views of {report.unmatched_contents} contents whose rows "
            "do not exist were kept (see `viewmw unmatched`)"
        )
    return text


async def _stats(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    assert tracker.store is not None
    stats = await operator_stats(tracker.redis, tracker.settings, tracker.store)
    if args.json:
        console.print(
            json.dumps(stats, indent=2, default=_json_value), markup=False, highlight=False
        )
        return EXIT_OK
    table = Table(title="viewmw abuse prevention")
    table.add_column("setting or count")
    table.add_column("value", justify="right")
    for name, value in stats.items():
        if name != "last_syncs":
            table.add_row(name, _show(value))
    console.print(table)
    syncs = Table(title="last syncs")
    for column in ("batch", "started (UTC)", "committed (UTC)", "contents", "views"):
        syncs.add_column(column)
    for batch in stats.get("last_syncs", []):
        syncs.add_row(
            batch["batch_id"][:12],
            _utc(batch["started_at"]),
            _utc(batch["committed_at"]),
            str(batch["contents"]),
            str(batch["views"]),
        )
    console.print(syncs)
    return EXIT_OK


async def _cleanup(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    removed = await sync.cleanup()
    console.print(f"removed {removed} old tracking keys", markup=False)
    return EXIT_OK


async def _init_db(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    assert tracker.store is not None
    await tracker.store.create_tables()
    console.print("tables are ready", markup=False)
    return EXIT_OK


async def _unmatched(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    store = tracker.store
    assert store is not None
    moved = await store.retry_unmatched() if args.retry else None
    kept = await store.unmatched_views(limit=max(args.limit, 0))
    contents, views = await store.unmatched_totals()
    if args.json:
        document: dict[str, Any] = {
            "unmatched_contents": contents,
            "unmatched_views": views,
            "unmatched": [_unmatched_json(entry) for entry in kept],
        }
        if moved is not None:
            document["moved"] = [
                {"content_type": t, "content_id": i, "view_count": n}
                for (t, i), n in sorted(moved.items())
            ]
        console.print(json.dumps(document, indent=2), markup=False, highlight=False)
        return EXIT_OK
    if moved is not None:
        console.print(
            f"moved {sum(moved.values())} views of {len(moved)} contents into their rows",
            markup=False,
        )
    if not contents:
        console.print("no unmatched views", markup=False)
        return EXIT_OK
    table = Table(title=f"unmatched views: {views} views of {contents} contents")
    for column in ("type", "id", "views", "first seen (UTC)", "last seen (UTC)"):
        table.add_column(column, justify="right" if column == "views" else "left")
    for entry in kept:
        table.add_row(
            entry.content_type,
            entry.content_id,
            str(entry.view_count),
            _utc(entry.first_seen),
            _utc(entry.last_seen),
        )
    console.print(table)
    if contents > len(kept):
        console.print(f"… and {contents - len(kept)} more (--limit)", markup=False)
    return EXIT_OK


async def _health(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    thresholds = HealthThresholds(
        max_pending_contents=args.max_pending,
        max_sync_age_seconds=args.max_sync_age,
        max_outbox_events=args.max_outbox,
    )
    redis = redis_for_background(settings)
    store = Store.from_settings(settings)
    try:
        report = await check_health(redis, store, settings, thresholds)
    finally:
        await redis.aclose()
        await store.close()
    if args.json:
        console.print(json.dumps(report.to_dict(), indent=2), markup=False, highlight=False)
    else:
        table = Table(title=f"viewmw health: {'ok' if report.ok else 'UNHEALTHY'}")
        for column in ("check", "ok", "detail"):
            table.add_column(column)
        for check in report.checks:
            table.add_row(check.name, "ok" if check.ok else "FAIL", check.detail)
        console.print(table)
    if report.unreachable:
        return EXIT_UNAVAILABLE
    return EXIT_OK if report.ok else EXIT_FAILED


def _json_value(value: Any) -> Any:
    """Datetimes as ISO strings (in UTC) for ``--json``."""
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _unmatched_json(entry: UnmatchedViews) -> dict[str, Any]:
    return {
        "content_type": entry.content_type,
        "content_id": entry.content_id,
        "view_count": entry.view_count,
        "first_seen": _utc(entry.first_seen),
        "last_seen": _utc(entry.last_seen),
    }


def _enqueue(console: Console) -> int:
    try:  # the worker extra is only needed here
        from dramatiq.errors import BrokerError

        from viewmw.jobs.actors import sync_view_counts
        from viewmw.jobs.broker import worker_settings
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "sync --enqueue", f"needs the worker extra: pip install 'viewmw[worker]' ({exc})"
        ) from None
    try:
        message = sync_view_counts.send()
    except (BrokerError, RedisError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceUnavailableError(
            f"the broker at {redacted(worker_settings.broker_url)} is not reachable ({reason}). "
            "Start it or set VIEWMW_BROKER_URL."
        ) from None
    console.print(f"sync queued as message {message.message_id}", markup=False)
    return EXIT_OK


def _utc(value: datetime) -> str:
    # Short enough for the table to fit 80 columns (an ISO string with its offset is cropped).
    # SQLite returns the ledger's UTC times without their zone.
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if hasattr(value, "isoformat"):
        return str(value.isoformat(timespec="seconds"))
    return str(value)


_COMMANDS: dict[str, Command] = {
    "sync": _sync,
    "stats": _stats,
    "cleanup": _cleanup,
    "init-db": _init_db,
    "unmatched": _unmatched,
    "top": top_command,
    "views": views_command,
    "migrate-keys": migrate_command,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
