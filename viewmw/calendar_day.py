"""Calendar days in the configured time zone: the one place where a moment becomes a day.

Daily limits, anonymous viewer keys, the per-day history and its reads all name days the same
way (``YYYY-MM-DD`` in ``Settings.timezone``), so they all ask here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class CalendarDay:
    """One calendar day of a zone: its name and the Unix seconds where it starts and ends.

    A day is 23 or 25 hours long when the clocks change in it.
    """

    name: str
    start: int
    end: int

    def __contains__(self, moment: float) -> bool:
        return self.start <= moment < self.end


def local_date(moment: float, zone: ZoneInfo) -> date:
    """The date in ``zone`` at ``moment`` (Unix seconds)."""
    # Whole seconds: every day starts on one, and datetime rounds a fraction to microseconds,
    # which would carry a moment a hair before midnight into the next day.
    return datetime.fromtimestamp(math.floor(moment), zone).date()


def calendar_day(moment: float, zone: ZoneInfo) -> CalendarDay:
    """The calendar day of ``zone`` that ``moment`` (Unix seconds) falls in."""
    local = local_date(moment, zone)
    start = datetime.combine(local, time(), zone)
    end = datetime.combine(local + timedelta(days=1), time(), zone)
    return CalendarDay(local.isoformat(), int(start.timestamp()), int(end.timestamp()))
