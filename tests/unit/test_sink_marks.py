"""The hours a batch marks for the rollups: exactly the hours its readings fall in."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from fleet_telemetry.consumers.sink import hour_marks

T0 = datetime(2026, 11, 25, 9, 59, 30, tzinfo=timezone.utc)


def hours(times: list[datetime]) -> set[datetime]:
    return {t.replace(minute=0, second=0, microsecond=0) for t in times}


@given(st.lists(st.integers(min_value=-3 * 3_600_000_000, max_value=3 * 3_600_000_000), min_size=1, max_size=50))
def test_the_marks_cover_exactly_the_hours_of_the_batch(offsets: list[int]) -> None:
    times = [T0 + timedelta(microseconds=us) for us in offsets]
    assert hours(hour_marks(times)) == hours(times)


def test_a_live_batch_sends_two_times_and_a_wide_one_all() -> None:
    live = [T0 + timedelta(seconds=s) for s in range(0, 3000, 7)]
    assert hour_marks(live) == [live[0], live[-1]]
    wide = [T0, T0 + timedelta(hours=5), T0 + timedelta(minutes=1)]
    assert hour_marks(wide) == wide
