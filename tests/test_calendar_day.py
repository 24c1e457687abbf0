"""Calendar days in a zone, across the changes of the clocks."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from viewmw.calendar_day import calendar_day, local_date

BERLIN = ZoneInfo("Europe/Berlin")
ZONES = [ZoneInfo(name) for name in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu")]


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_a_moment_belongs_to_the_day_of_its_zone() -> None:
    moment = _at("2026-10-24T22:30:00")  # 00:30 on the 25th in Berlin
    assert local_date(moment, ZoneInfo("UTC")) == date(2026, 10, 24)
    assert local_date(moment, BERLIN) == date(2026, 10, 25)
    assert calendar_day(moment, BERLIN).name == "2026-10-25"


def test_days_are_23_or_25_hours_long_when_the_clocks_change() -> None:
    spring = calendar_day(_at("2026-03-29T12:00:00"), BERLIN)
    autumn = calendar_day(_at("2026-10-25T12:00:00"), BERLIN)
    ordinary = calendar_day(_at("2026-06-01T12:00:00"), BERLIN)
    assert spring.end - spring.start == 23 * 3600
    assert autumn.end - autumn.start == 25 * 3600
    assert ordinary.end - ordinary.start == 24 * 3600
    assert autumn.start == _at("2026-10-24T22:00:00")


def test_a_moment_a_hair_before_midnight_is_in_the_day_it_ends() -> None:
    # datetime rounds to microseconds: 23:59:59.9999995 must not become the next day.
    day = calendar_day(2051222399.9999995, ZoneInfo("UTC"))
    assert (day.name, day.end) == ("2034-12-31", 2051222400)


@given(
    st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
    st.sampled_from(ZONES),
)
def test_every_moment_is_inside_its_day_and_days_follow_each_other(
    moment: float, zone: ZoneInfo
) -> None:
    day = calendar_day(moment, zone)
    assert moment in day
    assert day.name == local_date(moment, zone).isoformat()
    assert calendar_day(day.end, zone).start == day.end
    assert calendar_day(day.start - 1, zone).end == day.start
