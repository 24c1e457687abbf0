"""The stats page's HTML: pure functions from the numbers read to one escaped page.

Every value that came from outside (content ids, reasons, batch ids, health details) goes
through :func:`html.escape` here, and nothing else builds markup. The page skeleton and its
style live in ``viewmw/templates/``; the style is inlined and allowed by its hash, so the
Content-Security-Policy admits no script at all.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from html import escape
from importlib import resources
from string import Template
from typing import Any

from viewmw.contract import BlockReason
from viewmw.health import HealthReport

# The chart's drawing area, in SVG user units.
CHART_WIDTH, CHART_HEIGHT = 640, 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 8, 18, 22
_MAX_BAR_WIDTH = 40


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A panel (or part of one) that could not be read; ``reason`` is short and safe to show."""

    reason: str


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """One committed sync, as the ledger keeps it."""

    batch_id: str
    started_at: datetime
    committed_at: datetime
    contents: int
    views: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SyncBatch:
        """From a row of :meth:`viewmw.Store.last_batches`."""
        return cls(
            str(row["batch_id"]),
            _utc(row["started_at"]),
            _utc(row["committed_at"]),
            int(row["contents"]),
            int(row["views"]),
        )


@dataclass(frozen=True, slots=True)
class BreakerView:
    """The circuit breaker's state and how often it opened since the process started."""

    state: str
    opened_count: int


@dataclass(frozen=True, slots=True)
class TopCell:
    """The top contents of one type for one period."""

    content_type: str
    period: str
    entries: list[tuple[str, int]] | Unavailable


@dataclass(frozen=True, slots=True)
class PageData:
    """Everything the page shows."""

    title: str
    generated_at: datetime
    health: HealthReport | Unavailable
    breaker: BreakerView | None
    syncs: list[SyncBatch] | Unavailable
    periods: list[str]
    top: list[TopCell]
    blocked: dict[str, dict[str, int] | Unavailable]


def render_page(data: PageData) -> str:
    """The whole page as HTML."""
    return _template().substitute(
        title=_e(data.title),
        style=_style(),
        generated=_e(_when(data.generated_at)),
        outage=render_outage(data.health, data.breaker),
        syncs=render_syncs(data.syncs),
        top=render_top(data.top, data.periods),
        blocked=render_blocked(data.blocked, data.periods),
    )


def response_headers() -> list[tuple[bytes, bytes]]:
    """Headers of the page: never cached, never framed, no script, only its own style."""
    policy = (
        f"default-src 'none'; style-src '{_style_hash()}'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    return [
        (b"content-security-policy", policy.encode("ascii")),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


# Panels -------------------------------------------------------------------------------------------


def render_outage(health: HealthReport | Unavailable, breaker: BreakerView | None) -> str:
    """The health checks and, when the app uses one, the circuit breaker."""
    parts = []
    if isinstance(health, Unavailable):
        parts.append(_unavailable(health))
    else:
        verdict = "healthy" if health.ok else "unhealthy"
        parts.append(f'<p class="verdict {verdict}" id="health-verdict">{verdict.capitalize()}</p>')
        rows = "".join(
            f'<tr class="{"ok" if check.ok else "failing"}" data-check="{_e(check.name)}">'
            f"<th>{_e(check.name)}</th><td>{'ok' if check.ok else 'failing'}</td>"
            f"<td>{_e(check.detail)}</td></tr>"
            for check in health.checks
        )
        parts.append(
            "<table><thead><tr><th>check</th><th>state</th><th>detail</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    if breaker is not None:
        closed = breaker.state == "closed"
        parts.append(
            f'<p class="breaker {"ok" if closed else "failing"}" id="breaker">'
            f"Redis circuit breaker: <strong>{_e(breaker.state)}</strong> "
            f"(opened {breaker.opened_count:,} times since this process started)</p>"
        )
    return "".join(parts)


def render_syncs(syncs: list[SyncBatch] | Unavailable) -> str:
    """The last syncs: a bar chart of views moved per batch, and the batches as a table."""
    if isinstance(syncs, Unavailable):
        return _unavailable(syncs)
    if not syncs:
        return '<p class="empty">No sync has committed yet.</p>'
    rows = "".join(
        f'<tr data-batch="{_e(batch.batch_id)}"><td>{_e(batch.batch_id)}</td>'
        f"<td>{_e(_when(batch.committed_at))}</td>"
        f'<td class="num">{_duration(batch):.1f}s</td>'
        f'<td class="num">{batch.contents:,}</td><td class="num">{batch.views:,}</td></tr>'
        for batch in syncs
    )
    table = (
        f"<details><summary>The last {len(syncs)} syncs</summary><table>"
        '<thead><tr><th>batch</th><th>committed</th><th class="num">took</th>'
        '<th class="num">contents</th><th class="num">views</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></details>"
    )
    return sync_chart(syncs) + table


def sync_chart(syncs: Sequence[SyncBatch]) -> str:
    """An inline SVG bar chart of views per batch, oldest on the left (``syncs`` newest first)."""
    batches = list(reversed(syncs))
    plot_width = CHART_WIDTH - _LEFT - _RIGHT
    plot_height = CHART_HEIGHT - _TOP - _BOTTOM
    slot = plot_width / len(batches)
    bar_width = min(slot * 0.7, _MAX_BAR_WIDTH)
    peak = max(batch.views for batch in batches)
    baseline = _TOP + plot_height
    bars = []
    for index, batch in enumerate(batches):
        height = batch.views / (peak or 1) * plot_height
        if batch.views:
            height = max(height, 1.0)  # a batch that moved views never looks empty
        x = _LEFT + index * slot + (slot - bar_width) / 2
        label = (
            f"batch {batch.batch_id}: {batch.views:,} views of {batch.contents:,} contents, "
            f"committed {_when(batch.committed_at)}"
        )
        bars.append(
            f'<g class="bar" data-views="{batch.views}"><title>{_e(label)}</title>'
            f'<rect x="{x:.1f}" y="{baseline - height:.1f}" width="{bar_width:.1f}" '
            f'height="{height:.1f}"></rect>'
            f'<text x="{x + bar_width / 2:.1f}" y="{baseline - height - 4:.1f}" '
            f'text-anchor="middle">{batch.views:,}</text></g>'
        )
    first, last = batches[0], batches[-1]
    axis = (
        f'<line x1="{_LEFT}" y1="{baseline}" x2="{CHART_WIDTH - _RIGHT}" y2="{baseline}"></line>'
        f'<text class="axis" x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{peak:,}</text>'
        f'<text class="axis" x="{_LEFT - 6}" y="{baseline}" text-anchor="end">0</text>'
        f'<text class="axis" x="{_LEFT}" y="{CHART_HEIGHT - 4}">'
        f"{_e(_when(first.committed_at))}</text>"
    )
    if len(batches) > 1:
        axis += (
            f'<text class="axis" x="{CHART_WIDTH - _RIGHT}" y="{CHART_HEIGHT - 4}" '
            f'text-anchor="end">{_e(_when(last.committed_at))}</text>'
        )
    return (
        f'<svg class="chart" id="sync-chart" role="img" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" aria-labelledby="sync-chart-title">'
        f'<title id="sync-chart-title">Views moved by each of the last {len(batches)} syncs'
        f"</title>{axis}{''.join(bars)}</svg>"
    )


def render_top(cells: Sequence[TopCell], periods: Sequence[str]) -> str:
    """Per content type, one ranked list per period."""
    if not cells:
        return (
            '<p class="empty">No content types to show: name them in the page\'s '
            "<code>content_types</code>.</p>"
        )
    types: dict[str, list[TopCell]] = {}
    for cell in cells:
        types.setdefault(cell.content_type, []).append(cell)
    sections = []
    for content_type, row in types.items():
        lists = "".join(_top_list(cell) for cell in row)
        sections.append(
            f'<section class="type" data-type="{_e(content_type)}"><h3>{_e(content_type)}</h3>'
            f'<div class="periods">{lists}</div></section>'
        )
    return "".join(sections)


def render_blocked(
    blocked: Mapping[str, dict[str, int] | Unavailable], periods: Sequence[str]
) -> str:
    """Blocked views by reason: one row per reason, one column per period."""
    reasons = [str(reason) for reason in BlockReason]
    for counts in blocked.values():
        if not isinstance(counts, Unavailable):
            reasons += sorted(set(counts) - set(reasons))
    head = "".join(f'<th class="num">{_e(period)}</th>' for period in periods)
    rows = []
    for reason in reasons:
        cells = "".join(_blocked_cell(blocked[period], reason) for period in periods)
        rows.append(f'<tr data-reason="{_e(reason)}"><th>{_e(reason)}</th>{cells}</tr>')
    totals = "".join(
        '<td class="unavailable">unavailable</td>'
        if isinstance(counts := blocked[period], Unavailable)
        else f'<td class="num">{sum(counts.values()):,}</td>'
        for period in periods
    )
    return (
        f"<table><thead><tr><th>reason</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
        f'<tfoot><tr data-reason="total"><th>total</th>{totals}</tr></tfoot></table>'
    )


# Pieces -------------------------------------------------------------------------------------------


def _top_list(cell: TopCell) -> str:
    heading = f"<h4>{_e(cell.period)}</h4>"
    attributes = f'class="top" data-period="{_e(cell.period)}"'
    if isinstance(cell.entries, Unavailable):
        return f"<div {attributes}>{heading}{_unavailable(cell.entries)}</div>"
    if not cell.entries:
        return f'<div {attributes}>{heading}<p class="empty">No views.</p></div>'
    rows = "".join(
        f'<tr><td class="num">{rank}</td><td class="id">{_e(content_id)}</td>'
        f'<td class="num">{views:,}</td></tr>'
        for rank, (content_id, views) in enumerate(cell.entries, 1)
    )
    return (
        f'<div {attributes}>{heading}<table><thead><tr><th class="num">#</th><th>id</th>'
        f'<th class="num">views</th></tr></thead><tbody>{rows}</tbody></table></div>'
    )


def _blocked_cell(counts: dict[str, int] | Unavailable, reason: str) -> str:
    if isinstance(counts, Unavailable):
        return '<td class="unavailable">unavailable</td>'
    return f'<td class="num">{counts.get(reason, 0):,}</td>'


def _unavailable(missing: Unavailable) -> str:
    return f'<p class="unavailable">unavailable ({_e(missing.reason)})</p>'


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _utc(moment: datetime) -> datetime:
    # SQLite returns the ledger's UTC times without their zone.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(batch: SyncBatch) -> float:
    return max((batch.committed_at - batch.started_at).total_seconds(), 0.0)


@cache
def _template() -> Template:
    return Template(_resource("stats_page.html"))


@cache
def _style() -> str:
    return _resource("stats_page.css")


@cache
def _style_hash() -> str:
    digest = hashlib.sha256(_style().encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


def _resource(name: str) -> str:
    return resources.files("viewmw").joinpath("templates", name).read_text(encoding="utf-8")
