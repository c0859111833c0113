"""The pure rules of ``fleet maintain``: durations, cutoffs, schedules, names, the report."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.metrics import MaintainMetrics
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.lifecycle.locks import day_lock_number
from fleet_telemetry.lifecycle.policy import (
    LifecyclePolicy,
    add_months,
    expired_raw_days,
    last_stats_refresh_slot,
    parse_every,
    rollup_cutoff,
    stats_refresh_due,
    telemetry_partition_day,
    utc_day,
)
from fleet_telemetry.lifecycle.report import PassReport, record_pass
from fleet_telemetry.lifecycle.rollups import MERGE_INTO_DAILY, MERGE_INTO_HOURLY, Horizons, RollupReport


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "seconds"), [("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("90", 90.0), ("0.5m", 30.0), (" 2h ", 7200.0)]
)
def test_every_takes_seconds_minutes_and_hours(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "m", "-1m", "0s", "1d", "5mm"])
def test_every_refuses_anything_else(text: str) -> None:
    with pytest.raises(UsageError):
        parse_every(text)


def test_a_raw_day_expires_once_all_of_it_is_older_than_the_retention() -> None:
    days = [date(2026, 1, d) for d in range(1, 6)]
    # 2026-02-03 12:00 minus 30 days is 2026-01-04 12:00: days ending by then are expired.
    assert expired_raw_days(days, utc(2026, 2, 3, 12), 30) == [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    assert expired_raw_days(days[::-1], utc(2026, 2, 3, 12), 30) == [date(2026, 1, 1), date(2026, 1, 2),
                                                                        date(2026, 1, 3)]
    assert expired_raw_days(days, utc(2026, 2, 3, 0), 30) == [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    assert expired_raw_days(days, utc(2026, 2, 2, 23, 59), 30) == [date(2026, 1, 1), date(2026, 1, 2)]


def test_rollup_retention_removes_whole_utc_days() -> None:
    assert rollup_cutoff(utc(2026, 6, 1, 15, 30), 365) == utc(2025, 6, 1)
    assert rollup_cutoff(datetime(2026, 6, 1, 1, 0, tzinfo=timezone(timedelta(hours=5))), 1) == utc(2026, 5, 30)


def test_the_nightly_refresh_is_due_once_after_each_slot() -> None:
    assert last_stats_refresh_slot(utc(2026, 3, 10, 3, 0), 3) == utc(2026, 3, 10, 3)
    assert last_stats_refresh_slot(utc(2026, 3, 10, 2, 59), 3) == utc(2026, 3, 9, 3)
    assert stats_refresh_due(None, utc(2026, 3, 10, 12), 3)
    assert not stats_refresh_due(utc(2026, 3, 10, 3, 5), utc(2026, 3, 10, 23), 3)
    assert not stats_refresh_due(utc(2026, 3, 10, 3, 5), utc(2026, 3, 11, 2, 59), 3)
    assert stats_refresh_due(utc(2026, 3, 10, 3, 5), utc(2026, 3, 11, 3, 0), 3)
    assert stats_refresh_due(utc(2026, 3, 1), utc(2026, 3, 10, 0, 30), 0)


def test_partition_names_give_their_day() -> None:
    assert telemetry_partition_day("vehicle_telemetry_p20260229") is None  # not a date
    assert telemetry_partition_day("vehicle_telemetry_p20240229") == date(2024, 2, 29)
    assert telemetry_partition_day("vehicle_telemetry_default") is None
    assert telemetry_partition_day("vehicle_telemetry_p2024022") is None


def test_months_ahead_roll_over_the_year() -> None:
    assert add_months(date(2026, 11, 25), 2) == date(2027, 1, 1)
    assert add_months(date(2026, 1, 31), 0) == date(2026, 1, 1)
    assert add_months(date(2026, 12, 1), 13) == date(2028, 1, 1)


def test_retentions_must_nest() -> None:
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    assert LifecyclePolicy.from_settings(base).hourly_retention_days == 365
    with pytest.raises(UsageError, match="FLEET_HOURLY_RETENTION_DAYS"):
        LifecyclePolicy.from_settings(base.model_copy(update={"hourly_retention_days": 7}))
    with pytest.raises(UsageError, match="FLEET_DAILY_RETENTION_DAYS"):
        LifecyclePolicy.from_settings(base.model_copy(update={"daily_retention_days": 100}))
    assert LifecyclePolicy.from_settings(base.model_copy(update={"daily_retention_days": 3650}))


def test_horizons_and_day_locks() -> None:
    assert Horizons(raw=None, hourly=None).raw_kept(utc(1990, 1, 1))
    kept = Horizons(raw=utc(2026, 1, 2), hourly=utc(2025, 1, 2))
    assert not kept.raw_kept(utc(2026, 1, 1, 23)) and kept.raw_kept(utc(2026, 1, 2))
    assert not kept.hourly_kept(utc(2025, 1, 1)) and kept.hourly_kept(utc(2025, 1, 2))
    assert day_lock_number(date(1970, 1, 2)) == 1
    assert day_lock_number(utc(2026, 1, 2, 23, 59)) == day_lock_number(date(2026, 1, 2))
    assert utc_day(datetime(2026, 1, 2, 1, tzinfo=timezone(timedelta(hours=3)))) == utc(2026, 1, 1)


def test_merges_combine_every_rollup_column() -> None:
    for statement in (MERGE_INTO_HOURLY, MERGE_INTO_DAILY):
        for column in ("samples", "avg_speed", "first_fuel", "last_fuel", "distance_km", "last_location", "first_time"):
            assert f"{column} = " in statement


def test_the_report_speaks_in_the_future_for_a_dry_run() -> None:
    report = PassReport(
        now=utc(2026, 1, 1), dry_run=True, rows_moved={"vehicle_telemetry_p20260105": 3},
        telemetry_partitions_created=["vehicle_telemetry_p20260108"],
        raw_partitions_dropped=["vehicle_telemetry_p20251130"],
        rollups=RollupReport(pending_hours=4, lag_seconds=61.2), stats_refreshed=True,
    )
    assert report.lines() == [
        "would move 3 default-partition rows into vehicle_telemetry_p20260105",
        "would create partition vehicle_telemetry_p20260108",
        "would roll up 4 dirty hours (oldest marked 61 s ago)",
        "would drop partition vehicle_telemetry_p20251130 (past the raw retention)",
        "would refresh monthly_vehicle_stats",
        "would refresh monthly_vehicle_revenue",
        "dry run: nothing was changed",
    ]
    done = PassReport(now=utc(2026, 1, 1), rollups=RollupReport(hours=5, days=2), deferred=["claiming dirty hours"],
                      raw_partitions_kept={"vehicle_telemetry_p20251130": "2 hours not rolled up yet"},
                      duration_seconds=0.25)
    assert done.lines() == [
        "rolled up 5 hours and 2 days",
        "kept partition vehicle_telemetry_p20251130 past the raw retention: 2 hours not rolled up yet",
        "deferred claiming dirty hours: its lock stayed busy; the next pass retries",
        "pass done in 0.25 s",
    ]


def test_metrics_count_a_pass_and_parse_as_prometheus_text() -> None:
    metrics = MaintainMetrics()
    report = PassReport(
        now=utc(2026, 1, 1), telemetry_partitions_created=["a", "b"], rows_moved={"c": 7},
        raw_partitions_dropped=["d"], rollups=RollupReport(hours=3, pending_hours=2, lag_seconds=42.0),
    )
    record_pass(metrics, report, finished_at=1_767_225_600.0)
    assert metrics.value("fleet_maintain_partitions_created_total", table="vehicle_telemetry") == 3
    assert metrics.value("fleet_maintain_partitions_dropped_total", table="vehicle_telemetry") == 1
    assert metrics.value("fleet_maintain_default_rows_moved_total") == 7
    assert metrics.value("fleet_maintain_rollup_lag_seconds") == 42.0
    assert metrics.value("fleet_maintain_last_success_timestamp_seconds") == 1_767_225_600.0
    names = {family.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert {"fleet_maintain_passes", "fleet_maintain_rollup_pending"} <= names
