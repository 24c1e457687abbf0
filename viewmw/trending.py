"""The rounds of :meth:`viewmw.analytics.ViewStats.top`: the most viewed ids of a period, exact.

Candidates are the top of the history and the top of Redis' rankings; their totals are completed
from the other side, and a round tells whether an id outside the candidates could still reach the
last place (then the caller widens the search; see docs/history.md).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from viewmw.replies import text_of
from viewmw.shard_reads import group_by_shard, run_on_shards
from viewmw.sync import decode_days

if TYPE_CHECKING:
    from viewmw.analytics import ViewStats

# Periods up to this many days rank from each day's leaders (an index range per day); longer or
# open ones from the period's sums (a scan of its rows).
_DAY_LISTS_UP_TO = 62


async def top_round(
    stats: ViewStats,
    content_type: str,
    first: date | None,
    last: date | None,
    live: list[str],
    limit: int,
    n: int,
) -> tuple[list[tuple[str, int]], bool] | None:
    """One round of :meth:`top` with ``n`` candidates from each side; ``None`` when a sync
    moved views during it. Returns the ranked candidates and whether they are the answer.

    Redis' side is one ``read_ranking`` per content shard (all of them: any may hold a
    leader), each its shard's top ``n``, merged here; then one more per shard of the
    candidates, for the Redis part of the history's candidates and to check each shard's
    epoch. A single Redis is one shard: two calls, as ever."""
    heads = await run_on_shards(
        stats.redis,
        stats.scripts.read_ranking,
        [
            (
                [keys.epoch, keys.sync_batch, *(keys.ranking(content_type, d) for d in live)],
                [keys.sync_batch_days_template, content_type, n if live else 0],
            )
            for keys in stats.shards.schemas
        ],
    )
    epochs = [int(head[0]) for head in heads]
    batches = [text_of(head[1]) for head in heads]
    seen: dict[str, tuple[int, str]] = {}
    cut = False  # whether some shard had more than its n
    for head in heads:
        entries = _ranking_entries(head)
        cut = cut or (bool(live) and len(entries) == n)
        seen.update(entries)
    # The n most viewed of all shards; an id outside them has no more than the n-th (a
    # shard cut at n holds n ids with at least its own n-th).
    from_redis = dict(sorted(seen.items(), key=lambda item: (-item[1][0], item[0]))[:n])
    committed = await stats._committed(batches)
    candidates = list(from_redis)
    history: dict[str, int] = {}
    history_full, history_bound = False, 0
    if stats._history is not None:
        leaders, history_full, history_bound = await _history_leaders(
            stats, content_type, first, last, n
        )
        candidates = list(dict.fromkeys([*leaders, *from_redis]))
        history = await stats._history.sums(content_type, candidates, first, last)
    if committed != await stats._committed(batches):
        return None
    pending = {i: seen[i] for i in candidates if i in seen}
    by_shard = group_by_shard(stats.shards, content_type, candidates)
    if not stats.shards.clustered:
        by_shard = {0: by_shard.get(0, [])}  # the one shard's epoch is checked, as ever
    missing = {
        shard: [i for i in ids if i in history and i not in seen] for shard, ids in by_shard.items()
    }
    tails = await run_on_shards(
        stats.redis,
        stats.scripts.read_ranking,
        [
            (
                [keys.epoch, keys.sync_batch, *(keys.ranking(content_type, d) for d in live)],
                [keys.sync_batch_days_template, content_type, 0, *missing[shard]],
            )
            for shard in by_shard
            for keys in [stats.shards.schemas[shard]]
        ],
    )
    for shard, tail in zip(by_shard, tails, strict=True):
        if int(tail[0]) != epochs[shard]:
            return None
        pending.update(_ranking_entries(tail))
    totals: dict[str, int] = {}
    for content_id in set(history) | set(pending):
        views, batch = pending.get(content_id, (0, ""))
        if batches[stats.shards.index(content_type, content_id)] in committed:
            # The history holds the batch's part already.
            for name, (amount, _) in decode_days(batch).items():
                day = date.fromisoformat(name)
                if (first is None or day >= first) and (last is None or day <= last):
                    views -= amount
        totals[content_id] = history.get(content_id, 0) + views
    ranked = sorted(
        ((i, v) for i, v in totals.items() if v > 0), key=lambda item: (-item[1], item[0])
    )
    redis_full = cut or len(seen) > n
    if not history_full and not redis_full:
        return ranked, True  # every id with views in the period is a candidate
    # No id outside the candidates has more than the last of each list it was not in.
    bound = history_bound + (min(v for v, _ in from_redis.values()) if redis_full else 0)
    return ranked, len(ranked) >= limit and ranked[limit - 1][1] > bound


async def _history_leaders(
    stats: ViewStats, content_type: str, first: date | None, last: date | None, n: int
) -> tuple[list[str], bool, int]:
    """Candidates from the history: the ``n`` leaders of each day of a bounded period (or
    of the whole period's sums when it is open or long), whether any list was cut at ``n``,
    and the most views an id outside every list can have."""
    assert stats._history is not None
    end = stats.today() if last is None else min(last, stats.today())
    if first is not None and (end - first).days < _DAY_LISTS_UP_TO:
        days = [first + timedelta(days=d) for d in range((end - first).days + 1)]
        lists = (await stats._history.day_leaders(content_type, days, n)).values()
        cut = [ranked for ranked in lists if len(ranked) == n]
        ids = [content_id for ranked in lists for content_id, _ in ranked]
        return ids, bool(cut), sum(ranked[-1][1] for ranked in cut)
    ranked = await stats._history.top(content_type, first, last, n)
    full = len(ranked) == n
    return [i for i, _ in ranked], full, ranked[-1][1] if full else 0


def _ranking_entries(reply: list[Any]) -> dict[str, tuple[int, str]]:
    """``read_ranking``'s entries: id -> (views not yet settled, the batch's days of it)."""
    return {
        text_of(reply[n]): (int(float(text_of(reply[n + 1]))), text_of(reply[n + 2]))
        for n in range(2, len(reply), 3)
    }
