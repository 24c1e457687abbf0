"""``viewmw top`` and ``viewmw views``: the per-day history from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from viewmw.analytics import ViewStats
from viewmw.periods import Period
from viewmw.sync import ViewSync
from viewmw.tracker import ViewTracker

EXIT_OK = 0
_PERIOD_HELP = "today, 7d, 30d (any Nd), all, or YYYY-MM-DD..YYYY-MM-DD (default: %(default)s)"


def add_history_parsers(commands: Any) -> None:
    """Add ``top`` and ``views`` to the command's sub-parsers."""
    top = commands.add_parser("top", help="the most viewed contents of a type over a period")
    top.add_argument("content_type", help="a content type, e.g. story")
    top.add_argument("--period", type=_period, default="7d", help=_PERIOD_HELP)
    top.add_argument("--limit", type=_positive, default=10, metavar="N", help="show N (10)")
    top.add_argument("--json", action="store_true", help="print JSON instead of a table")
    views = commands.add_parser(
        "views", help="one content's views, distinct viewers and crawler views over a period"
    )
    views.add_argument("content_type", help="a content type, e.g. story")
    views.add_argument("content_id", help="the content's id")
    views.add_argument("--period", type=_period, default="30d", help=_PERIOD_HELP)
    views.add_argument("--by-day", action="store_true", help="one row per day")
    views.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _period(text: str) -> Period:
    try:
        return Period.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1: {text!r}")
    return value


def _period_name(stats: ViewStats, period: Period) -> str:
    first, last = period.resolve(stats.today())
    return f"{first or 'the beginning'} .. {last or 'today'}"


async def top_command(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    """``viewmw top TYPE --period P --limit N [--json]``."""
    stats = ViewStats.from_tracker(tracker)
    ranked = await stats.top(args.content_type, args.period, args.limit)
    if args.json:
        document = [{"content_id": i, "views": v} for i, v in ranked]
        console.print(json.dumps(document, indent=2), markup=False, highlight=False)
        return EXIT_OK
    table = Table(title=f"most viewed {args.content_type}, {_period_name(stats, args.period)}")
    table.add_column("#", justify="right")
    table.add_column("id")
    table.add_column("views", justify="right")
    for place, (content_id, views) in enumerate(ranked, start=1):
        table.add_row(str(place), content_id, str(views))
    console.print(table)
    return EXIT_OK


async def views_command(
    tracker: ViewTracker, sync: ViewSync, args: argparse.Namespace, console: Console
) -> int:
    """``viewmw views TYPE ID --period P [--by-day] [--json]``."""
    stats = ViewStats.from_tracker(tracker)
    rows: list[dict[str, Any]]
    if args.by_day:
        days = await stats.by_day(args.content_type, args.content_id, args.period)
        rows = [
            {
                "day": d.day.isoformat(),
                "views": d.views,
                "unique_viewers": d.unique_viewers,
                "crawler_views": d.crawler_views,
            }
            for d in days
        ]
    else:
        count = await stats.views(args.content_type, args.content_id, args.period)
        first, last = args.period.resolve(stats.today())
        rows = [
            {
                "first": first and first.isoformat(),
                "last": (last or stats.today()).isoformat(),
                "views": count.views,
                "unique_viewers": count.unique_viewers,
                "crawler_views": count.crawler_views,
            }
        ]
    if args.json:
        console.print(json.dumps(rows, indent=2), markup=False, highlight=False)
        return EXIT_OK
    table = Table(
        title=f"{args.content_type} {args.content_id}, {_period_name(stats, args.period)}"
    )
    for column in rows[0] if rows else ("day", "views"):
        table.add_column(
            column.replace("_", " "),
            justify="left" if column in ("day", "first", "last") else "right",
        )
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row.values()))
    console.print(table)
    return EXIT_OK
