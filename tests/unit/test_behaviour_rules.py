"""Harsh braking and harsh acceleration: episodes from consecutive readings (pure, no services)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleet_telemetry.consumers.rules.alert_rows import plan_alert_rows
from fleet_telemetry.consumers.rules.evaluate import evaluate
from fleet_telemetry.core.reading import by_vehicle
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import AlertAction, Thresholds, VehicleState
from fleet_telemetry.consumers.rules.store import _memory, _state_from_row
from fleet_telemetry.core.reading import Reading, Source

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
VID = uuid.UUID("00000000-0000-0000-0000-00000000000b")
TH = Thresholds(harsh_braking_mps2=3.5, harsh_acceleration_mps2=3.0, behaviour_max_gap_seconds=5.0)
NO_FENCES = GeofenceIndex(())


def reading(seconds: float, speed: float | None) -> Reading:
    # Along a meridian at the speed reported, so no GPS jump and no geofence gets involved.
    lat = 45.0 + seconds * 0.0001
    return Reading(VID, T0 + timedelta(seconds=seconds), lat, 9.0, speed, None, None, None, None,
                   Source("t", 0, 0), None, b"")


def run(track: list[tuple[float, float | None]], state: VehicleState | None = None,
        th: Thresholds = TH) -> tuple[VehicleState, list[AlertAction]]:
    states = {VID: state or VehicleState()}
    result = evaluate(states, by_vehicle([reading(s, v) for s, v in track]), NO_FENCES, th, T0 + timedelta(hours=1))
    return states[VID], result.actions


def kinds(actions: list[AlertAction]) -> list[tuple[str, str, datetime]]:
    return [(a.action, a.type, a.reading_time) for a in actions]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_80_to_40_in_one_second_is_one_harsh_braking_episode() -> None:
    state, actions = run([(0, 80.0), (1, 80.0), (2, 40.0), (3, 38.0)])
    assert kinds(actions) == [("raise", "harsh_braking", at(2)), ("resolve", "harsh_braking", at(3))]
    raised, resolved = actions
    assert raised.details == {"acceleration_mps2": -11.11, "threshold_mps2": -3.5, "speed_before_kmh": 80.0,
                              "speed_kmh": 40.0, "seconds": 1.0, "since": at(1).isoformat()}
    assert resolved.details == {"peak_mps2": -11.11, "from_kmh": 80.0, "to_kmh": 40.0,
                                "ended_at": at(2).isoformat(), "duration_s": 1.0}
    assert state.harsh_since is None and state.open == set() and state.last_speed == 38.0


def test_a_braking_over_several_readings_is_one_episode_with_its_peak() -> None:
    _, actions = run([(0, 90.0), (1, 75.0), (2, 55.0), (3, 40.0), (4, 39.0)])
    assert kinds(actions) == [("raise", "harsh_braking", at(1)), ("resolve", "harsh_braking", at(4))]
    assert actions[1].details["peak_mps2"] == -5.56
    assert actions[1].details["from_kmh"] == 90.0 and actions[1].details["to_kmh"] == 40.0
    assert actions[1].details["duration_s"] == 3.0
    # One row, resolved: the two actions of one batch become one insert.
    rows = plan_alert_rows(actions)
    assert len(rows.inserts) == 1 and rows.inserts[0][1] is not None


def test_the_same_change_over_too_long_a_gap_fires_nothing() -> None:
    _, actions = run([(0, 80.0), (6, 40.0), (12, 80.0)])
    assert actions == []


def test_a_change_just_under_the_thresholds_fires_nothing() -> None:
    # -3.47 m/s² and +2.97 m/s²: under the thresholds.
    _, actions = run([(0, 80.0), (1, 67.5), (2, 67.5), (3, 78.2)])
    assert actions == []


def test_harsh_acceleration_then_harsh_braking_are_two_episodes() -> None:
    _, actions = run([(0, 0.0), (1, 12.0), (2, 24.0), (3, 30.0), (4, 10.0), (5, 10.0)])
    assert kinds(actions) == [
        ("raise", "harsh_acceleration", at(1)), ("resolve", "harsh_acceleration", at(3)),
        ("raise", "harsh_braking", at(4)), ("resolve", "harsh_braking", at(5))]
    assert actions[0].details["acceleration_mps2"] == 3.33 and actions[0].details["threshold_mps2"] == 3.0


def test_braking_straight_into_acceleration_closes_one_and_opens_the_other() -> None:
    _, actions = run([(0, 60.0), (1, 40.0), (2, 60.0), (3, 60.0)])
    assert kinds(actions) == [
        ("raise", "harsh_braking", at(1)), ("resolve", "harsh_braking", at(2)),
        ("raise", "harsh_acceleration", at(2)), ("resolve", "harsh_acceleration", at(3))]


def test_a_reading_without_speed_ends_an_episode_and_is_never_compared() -> None:
    _, actions = run([(0, 80.0), (1, 40.0), (2, None), (3, 0.0)])
    assert kinds(actions) == [("raise", "harsh_braking", at(1)), ("resolve", "harsh_braking", at(2))]


def test_an_episode_running_across_batches_is_resolved_once() -> None:
    state, first = run([(0, 80.0), (1, 40.0)])
    assert kinds(first) == [("raise", "harsh_braking", at(1))]
    assert state.harsh_since == at(0) and "harsh_braking" in state.open
    state, second = run([(2, 10.0), (3, 10.0)], state)
    assert kinds(second) == [("resolve", "harsh_braking", at(3))]
    assert second[0].details["peak_mps2"] == -11.11 and second[0].details["to_kmh"] == 10.0


def test_late_readings_fire_nothing() -> None:
    state, _ = run([(10, 80.0), (11, 80.0)])
    state, actions = run([(5, 80.0), (6, 20.0), (11, 20.0)], state)
    assert actions == []


def test_the_memory_survives_a_restart_mid_episode() -> None:
    state, _ = run([(0, 80.0), (1, 40.0)])
    row = {"last_time": state.last_time, "lat": None, "lon": None, "odometer_km": None, "memory": _memory(state)}
    restored = _state_from_row(row, {}, NO_FENCES)
    assert (restored.last_speed, restored.harsh_since, restored.harsh_from_kmh, restored.harsh_peak_mps2) == (
        40.0, at(0), 80.0, state.harsh_peak_mps2)
    _, actions = run([(2, 40.0)], restored)
    assert kinds(actions) == [("resolve", "harsh_braking", at(2))]


@pytest.mark.parametrize("speeds", [[50.0, 52.0, 49.0, 53.0], [0.0, 4.9, 0.0, 4.9]])
def test_small_changes_are_never_harsh_however_close_the_readings(speeds: list[Any]) -> None:
    # 4.9 km/h in 0.2 s would be 6.8 m/s²: speed noise, under the minimum change.
    _, actions = run([(0.2 * i, s) for i, s in enumerate(speeds)])
    assert actions == []
