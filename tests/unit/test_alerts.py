"""The alert rules and how a batch's actions become rows (pure, no services)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from fleet_telemetry.consumers.rules.alert_rows import plan_alert_rows
from fleet_telemetry.consumers.rules.evaluate import evaluate
from fleet_telemetry.core.reading import by_vehicle
from fleet_telemetry.consumers.rules.geometry import make_geofence
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import AlertAction, Thresholds, VehicleState
from fleet_telemetry.core.reading import Reading, Source

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
VID = uuid.UUID("00000000-0000-0000-0000-00000000000a")
TH = Thresholds(dwell_seconds=0.0, overspeed_kmh=100.0, overspeed_min_seconds=20.0, offline_seconds=600.0)
NO_FENCES = GeofenceIndex(())


def reading(seconds: float, lat: float = 50.0, lon: float = 10.0, **fields: Any) -> Reading:
    values: dict[str, Any] = {"speed": None, "fuel_level": None, "heading": None, "odometer_km": None,
                              "engine_status": None, **fields}
    return Reading(VID, T0 + timedelta(seconds=seconds), lat, lon, values["speed"], values["fuel_level"],
                   values["heading"], values["odometer_km"], values["engine_status"], Source("t", 0, 0), None, b"")


def run(readings: list[Reading], state: VehicleState | None = None, index: GeofenceIndex = NO_FENCES,
        th: Thresholds = TH, now: datetime = T0 + timedelta(hours=1)) -> tuple[VehicleState, Any]:
    states = {VID: state or VehicleState()}
    result = evaluate(states, by_vehicle(readings), index, th, now)
    return states[VID], result


def kinds(actions: list[AlertAction]) -> list[tuple[str, str, int | None]]:
    return [(a.action, a.type, a.geofence_id) for a in actions]


def test_overspeed_needs_the_minimum_duration_and_resolves_when_speed_drops() -> None:
    speeds = [90, 120, 90, 120, 125, 130, 110, 90, 95]  # 10 s apart: a 10 s burst, then 30 s over
    _, result = run([reading(10 * i, lon=10 + 0.002 * i, speed=float(s)) for i, s in enumerate(speeds)])
    assert kinds(result.actions) == [("raise", "overspeed", None), ("resolve", "overspeed", None)]
    raised, resolved = result.actions
    assert raised.reading_time == T0 + timedelta(seconds=50)
    assert raised.details["since"] == (T0 + timedelta(seconds=30)).isoformat()
    assert resolved.details["max_speed_kmh"] == 130 and resolved.details["duration_s"] == 40.0


def test_a_geofence_speed_limit_raises_an_alert_of_that_fence() -> None:
    ring = ((9.99, 10.01, 10.01, 9.99, 9.99), (49.99, 49.99, 50.01, 50.01, 49.99))
    index = GeofenceIndex([make_geofence(7, "school", "polygon", polygons=((ring,),), speed_limit_kmh=30.0)])
    track = [reading(10 * i, lon=10.0 + 0.0004 * i, speed=45.0) for i in range(4)]
    track.append(reading(40, lon=10.0016, speed=20.0))
    _, result = run(track, index=index)
    assert kinds(result.actions) == [("raise", "overspeed", 7), ("resolve", "overspeed", 7)]


def test_late_readings_are_skipped_and_counted() -> None:
    state, _ = run([reading(100, speed=50.0)])
    state, result = run([reading(50, speed=200.0, fuel_level=1.0), reading(100, speed=200.0)], state)
    assert result.late == 2 and result.actions == [] and result.states == {}
    assert state.last_time == T0 + timedelta(seconds=100)


def test_readings_of_one_batch_are_evaluated_in_event_time_order() -> None:
    out_of_order = [reading(20, fuel_level=50.0), reading(0, fuel_level=5.0), reading(10, fuel_level=8.0)]
    state, result = run(out_of_order)
    assert kinds(result.actions) == [("raise", "low_fuel", None), ("resolve", "low_fuel", None)]
    assert [a.reading_time for a in result.actions] == [T0, T0 + timedelta(seconds=20)]
    assert state.last_fuel == 50.0 and result.late == 0


def test_a_gps_jump_is_flagged_and_does_not_move_the_vehicle() -> None:
    track = [reading(0, lon=10.0), reading(10, lon=10.001), reading(20, lon=11.0), reading(30, lon=10.002)]
    state, result = run(track)
    assert kinds(result.actions) == [("raise", "gps_jump", None), ("resolve", "gps_jump", None)]
    assert result.actions[0].details["implied_speed_kmh"] > 300
    assert state.position is not None and state.position.lon == 10.002


def test_a_vehicle_that_really_moved_is_followed_after_a_second_consistent_reading() -> None:
    track = [reading(0, lon=10.0), reading(10, lon=12.0), reading(20, lon=12.0005), reading(30, lon=12.001)]
    state, result = run(track)
    assert kinds(result.actions) == [("raise", "gps_jump", None), ("resolve", "gps_jump", None)]
    assert state.position is not None and state.position.lon == 12.001


def test_a_sudden_drop_while_parked_is_theft_but_a_slow_fall_is_not() -> None:
    parked = [reading(60 * i, speed=0.0, fuel_level=f) for i, f in enumerate([80, 80, 75, 70, 70])]
    _, result = run(parked)
    assert kinds(result.actions) == [("raise", "fuel_drop", None)]
    assert result.actions[0].details["from_percent"] == 80 and result.actions[0].details["to_percent"] == 70
    idling = [reading(600 * i, speed=0.0, fuel_level=80.0 - 3 * i) for i in range(6)]  # 15 points in 50 min
    assert run(idling)[1].actions == []
    driving = [reading(60 * i, lon=10 + 0.01 * i, speed=60.0, fuel_level=80.0 - 5 * i) for i in range(4)]
    assert run(driving)[1].actions == []


def test_a_refuel_resolves_low_fuel_and_a_theft_alert() -> None:
    track = [reading(0, speed=0.0, fuel_level=30.0), reading(60, speed=0.0, fuel_level=8.0),
             reading(120, speed=0.0, fuel_level=9.0), reading(180, speed=0.0, fuel_level=80.0)]
    _, result = run(track)
    assert kinds(result.actions) == [("raise", "low_fuel", None), ("raise", "fuel_drop", None),
                                     ("resolve", "low_fuel", None), ("resolve", "fuel_drop", None)]


def test_new_trouble_codes_raise_then_update_then_clear() -> None:
    codes = [[], ["P0301"], ["P0301"], ["P0420", "P0301"], []]
    _, result = run([reading(10 * i, engine_status={"dtc": c}) for i, c in enumerate(codes)])
    assert kinds(result.actions) == [("raise", "engine_dtc", None), ("update", "engine_dtc", None),
                                     ("resolve", "engine_dtc", None)]
    assert result.actions[1].details == {"codes": ["P0301", "P0420"], "new": ["P0420"]}


def test_overheating_resolves_only_below_the_hysteresis() -> None:
    temps = [100, 106, 102, 104, 99]
    _, result = run([reading(10 * i, engine_status={"coolant_temp_c": c}) for i, c in enumerate(temps)])
    assert kinds(result.actions) == [("raise", "overheating", None), ("resolve", "overheating", None)]
    assert result.actions[1].reading_time == T0 + timedelta(seconds=40)


def test_a_fresh_reading_after_a_silence_may_resolve_an_offline_alert() -> None:
    now = T0 + timedelta(hours=2)
    state, _ = run([reading(0)], now=now)
    _, quiet = run([reading(60)], state, now=now)  # still older than the threshold: not back
    assert quiet.back_online == []
    _, back = run([reading(7190)], state, now=now)
    assert back.back_online == [VID] and VID in back.urgent


def test_a_batch_reduces_to_resolves_updates_and_inserts() -> None:
    v = VID
    actions = [
        AlertAction("resolve", "low_fuel", v, T0, {"a": 1}),  # opened by an earlier batch
        AlertAction("update", "engine_dtc", v, T0, {"codes": ["P1"]}),  # same
        AlertAction("raise", "overspeed", v, T0, {"since": "x"}),
        AlertAction("resolve", "overspeed", v, T0 + timedelta(seconds=5), {"max": 130}),
        AlertAction("raise", "overspeed", v, T0 + timedelta(seconds=9), {"since": "y"}),
        AlertAction("raise", "engine_dtc", uuid.uuid4(), T0, {"codes": ["P2"]}),
    ]
    rows = plan_alert_rows(actions)
    assert [a.type for a in rows.resolves] == ["low_fuel"]
    assert [a.type for a in rows.updates] == ["engine_dtc"]
    assert [(opened.details, None if closing is None else closing.details) for opened, closing in rows.inserts] == [
        ({"since": "x"}, {"max": 130}), ({"since": "y"}, None), ({"codes": ["P2"]}, None)]
