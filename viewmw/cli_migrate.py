"""``viewmw migrate-keys``: copy the rules' state from an old Redis to the one configured
(docs/keys.md, *Moving a single-node deployment to a cluster*)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rich.console import Console

from viewmw.connections import check_redis, redis_for_background
from viewmw.migration import KeyMigration
from viewmw.outage.outbox import Outbox
from viewmw.sync import ViewSync
from viewmw.tracker import ViewTracker

EXIT_OK = 0


def add_migrate_parser(commands: Any) -> None:
    """Add ``migrate-keys`` to the command's sub-parsers."""
    migrate = commands.add_parser(
        "migrate-keys",
        help="copy sessions, daily counters, sketches and replay markers from an old Redis",
        description=(
            "Copy the rules' state from the Redis at --from to the one VIEWMW_REDIS_URL names, "
            "under its key layout; keys it has already are left as they are. Sync the old "
            "Redis first (VIEWMW_REDIS_URL=<old> viewmw sync): pending views are not copied."
        ),
    )
    migrate.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="the old Redis: redis://… or redis+cluster://…",
    )
    migrate.add_argument("--json", action="store_true", help="print JSON instead of a summary")


async def migrate_command(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    """Run the copy into the configured Redis (``tracker.redis``) and say what it did."""
    source_settings = tracker.settings.replace(redis_url=args.source)
    source = redis_for_background(source_settings)
    try:
        await check_redis(source, source_settings)
        outbox = Outbox(tracker.store.engine) if tracker.store is not None else None
        migration = KeyMigration(
            source,
            tracker.redis,
            source_settings.content_shards(),
            tracker.shards,
            outbox,
        )
        report = await migration.run()
    finally:
        await source.aclose()
    if args.json:
        console.print_json(json.dumps(dataclasses.asdict(report)))
    else:
        console.print(
            f"copied {report.sessions} sessions, {report.daily_counters} daily counters, "
            f"{report.sketches} unique-viewer sketches ({report.sketches_merged} more merged into "
            f"the new Redis' own), {report.replay_markers} replay markers; "
            f"{report.already_there} were there already, {report.skipped_markers} markers "
            "belong to no waiting event",
            markup=False,
            highlight=False,
        )
    return EXIT_OK
