"""What a period is (today, the last N days, a date range, all time) and what a count over one
holds: the value types of :mod:`viewmw.analytics`' answers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta

_LAST_DAYS = re.compile(r"([1-9][0-9]{0,4})d")


@dataclass(frozen=True, slots=True)
class Period:
    """A span of calendar days in the configured time zone, inclusive at both ends; ``None`` is
    open. ``last_days`` (``today()`` is ``last_days(1)``) is resolved against the clock when a
    question is asked, so one ``Period`` can be kept and reused across midnight."""

    first: date | None
    last: date | None
    last_days_count: int | None = None

    @classmethod
    def today(cls) -> Period:
        """Today, whenever the question is asked."""
        return cls.last_days(1)

    @classmethod
    def last_days(cls, n: int) -> Period:
        """Today and the ``n - 1`` days before it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"last_days needs a whole number of days >= 1, got {n!r}")
        return cls(None, None, n)

    @classmethod
    def between(cls, first: date, last: date) -> Period:
        """From ``first`` to ``last``, both included."""
        if first > last:
            raise ValueError(f"a period cannot end ({last}) before it starts ({first})")
        return cls(first, last)

    @classmethod
    def all_time(cls) -> Period:
        """Every day."""
        return cls(None, None)

    @classmethod
    def parse(cls, text: str) -> Period:
        """``today``, ``7d``, ``30d``, ``all``, or ``2026-11-01..2026-11-30``."""
        value = text.strip().lower()
        if value == "today":
            return cls.today()
        if value in ("all", "all-time"):
            return cls.all_time()
        if match := _LAST_DAYS.fullmatch(value):
            return cls.last_days(int(match.group(1)))
        first, sep, last = value.partition("..")
        try:
            if sep:
                return cls.between(date.fromisoformat(first), date.fromisoformat(last))
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"a period is 'today', 'Nd' (7d, 30d), 'all' or 'YYYY-MM-DD..YYYY-MM-DD': {text!r}"
            ) from None
        return cls.between(day, day)

    def resolve(self, today: date) -> tuple[date | None, date | None]:
        """The period's first and last day, as of ``today``."""
        if self.last_days_count is not None:
            return today - timedelta(days=self.last_days_count - 1), today
        return self.first, self.last


@dataclass(frozen=True, slots=True)
class PeriodCount:
    """One content's counts over a period.

    Attributes:
        views: counted views in the period (exact).
        unique_viewers: distinct viewers who offered a view, counted or not (a HyperLogLog
            estimate, about 0.8 % standard error); ``None`` when unique viewers are off.
        crawler_views: crawler views, never part of ``views``.
    """

    views: int
    unique_viewers: int | None
    crawler_views: int


@dataclass(frozen=True, slots=True)
class DayCount:
    """One content's counts on one day (see :class:`PeriodCount`)."""

    day: date
    views: int
    unique_viewers: int | None
    crawler_views: int
