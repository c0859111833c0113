"""The score formula, the scores table as printed, and what a pass reports (pure, no services)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fleet_telemetry.core.geodesy import JUMP_MIN_DISTANCE_M as RULES_JUMP_M
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.lifecycle.driver_scores import JUMP_MIN_DISTANCE_M, score_of
from fleet_telemetry.lifecycle.policy import LifecyclePolicy, ScoreRules
from fleet_telemetry.lifecycle.report import PassReport, ScoresReport
from fleet_telemetry.views.driver_scores import render_scores


@pytest.mark.parametrize(("penalty", "km", "score"), [
    (15.0, 200.0, 92.5),   # two harsh brakings and an overspeed over 200 km
    (0.0, 12.3, 100.0),
    (13.0, 13.0, 0.0),     # 100 points per 100 km: nothing left
    (50.0, 10.0, 0.0),     # never below 0
    (0.0, 0.0, None),      # no distance, no score
    (5.0, 0.0, None),
])
def test_the_score_is_100_minus_the_penalty_per_100_km(penalty: float, km: float, score: float | None) -> None:
    assert score_of(penalty, km) == score


def test_the_scores_leave_out_the_gps_jumps_the_rules_flag() -> None:
    assert JUMP_MIN_DISTANCE_M == RULES_JUMP_M


def test_the_penalties_come_from_the_settings() -> None:
    settings = Settings(_env_file=None, behaviour_penalty_harsh_braking=7, behaviour_penalty_overspeed=1.5,
                        alert_max_gps_speed_kmh=250)
    assert LifecyclePolicy.from_settings(settings).scores == ScoreRules(
        penalty_harsh_braking=7.0, penalty_harsh_acceleration=3.0, penalty_overspeed=1.5, max_gps_speed_kmh=250.0)


def test_the_table_has_a_header_and_one_line_per_driver() -> None:
    rows = [
        {"driver_id": "d1", "name": "Ada Lovelace", "days": 3, "distance_km": 412.345, "harsh_braking": 2,
         "harsh_acceleration": 1, "overspeed": 0, "penalty_points": 13.0, "score": 96.8473},
        {"driver_id": "d2", "name": None, "days": 1, "distance_km": 0.0, "harsh_braking": 0,
         "harsh_acceleration": 0, "overspeed": 0, "penalty_points": 0.0, "score": None},
    ]
    header, first, second = render_scores(rows).splitlines()
    assert header.split() == ["driver", "days", "distance_km", "braking", "acceleration", "overspeed", "penalty",
                              "score"]
    assert first.split() == ["Ada", "Lovelace", "3", "412.3", "2", "1", "0", "13", "96.8"]
    assert second.split() == ["d2", "1", "0.0", "0", "0", "0", "0", "-"]
    assert render_scores([]) == "(no scored days in this period)"


def test_a_pass_reports_the_days_it_rescored() -> None:
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    report = PassReport(now=now, driver_scores=ScoresReport(days=2, hours=7, rows_changed=5))
    assert "recomputed the driver scores of 2 days (7 hours, 5 rows changed)" in report.lines()
    planned = PassReport(now=now, dry_run=True, driver_scores=ScoresReport(pending_hours=3))
    assert "would recompute the driver scores of 3 hours" in planned.lines()
    assert not any("driver scores" in line for line in PassReport(now=now).lines())
