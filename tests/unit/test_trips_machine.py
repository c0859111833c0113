"""The trips state machine on scripted tracks: trips, stops, gaps, minimum duration and
distance, ignition mode, idling, late readings, and a run split anywhere (as a restart
splits it) giving the same result."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleet_telemetry.core.geodesy import sphere_distance_m
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.trips.machine import advance, expire, ignition_of
from fleet_telemetry.trips.model import Changes, MotionState, MotionThresholds, trip_id
from fleet_telemetry.trips.store import memory_of, state_from_row

VID = uuid.UUID("00000000-0000-0000-0000-00000000000a")
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
SRC = Source("t", 0, 0)
TH = MotionThresholds()


def reading(seconds: float, lon: float, speed: float | None, lat: float = 41.9, **extra: Any) -> Reading:
    return Reading(VID, T0 + timedelta(seconds=seconds), lat, lon, speed, extra.get("fuel"), None,
                   extra.get("odometer"), extra.get("engine"), SRC, None, b"")


def drive(start_s: float, seconds: float, lon0: float, *, step: float = 10.0, dlon: float = 0.001,
          speed: float = 60.0, **extra: Any) -> list[Reading]:
    """Readings every ``step`` s moving ``dlon`` degrees east each."""
    return [reading(start_s + i * step, lon0 + i * dlon, speed, **extra) for i in range(int(seconds / step) + 1)]


def park(start_s: float, seconds: float, lon: float, *, step: float = 10.0, **extra: Any) -> list[Reading]:
    return [reading(start_s + i * step, lon, 0.0, **extra) for i in range(1, int(seconds / step) + 1)]


def run(readings: list[Reading], th: MotionThresholds = TH, st: MotionState | None = None) -> tuple[MotionState, Changes]:
    st = st or MotionState()
    out = Changes()
    advance(VID, st, readings, th, out)
    return st, out


def great_circle(readings: list[Reading]) -> float:
    return sum(sphere_distance_m(a.lon, a.lat, b.lon, b.lat) for a, b in zip(readings, readings[1:])) / 1000


def test_a_drive_a_stop_and_a_drive_are_two_trips_and_a_stop() -> None:
    first = drive(0, 600, 12.5)
    halt = park(600, 600, first[-1].lon)
    second = drive(1210, 600, first[-1].lon)
    st, out = run(first + halt + second)

    trips = {r.id: r for r in out.trips}
    assert list(trips) == [trip_id(VID, first[0].time), trip_id(VID, second[0].time)]
    ended = trips[trip_id(VID, first[0].time)]
    # The trip ends at the halt's first reading, where the stop starts.
    assert ended.end == first[-1].time + timedelta(seconds=10)
    assert ended.distance_km == pytest.approx(great_circle(first), rel=1e-4)
    assert ended.duration_s == 610 and ended.max_speed_kmh == 60.0
    assert trips[trip_id(VID, second[0].time)].end is None
    assert [(s.start, s.end) for s in out.stops] == [(ended.end, None), (ended.end, second[0].time)]
    assert st.trip is not None and st.trip.confirmed and st.stop is None
    assert st.odometer_km == pytest.approx(great_circle(first) + great_circle(second), rel=1e-4)


def test_a_short_movement_is_no_trip_and_keeps_the_stop() -> None:
    parked = park(0, 600, 12.5)
    shuffle = drive(610, 120, 12.5, dlon=0.0002, speed=10.0)  # 2 minutes, about 0.2 km
    st, out = run(parked + shuffle + park(730, 600, shuffle[-1].lon))
    assert out.trips == []
    assert [(s.start, s.end) for s in out.stops] == [(parked[0].time, None)]
    assert st.stop is not None and st.trip is None


def test_long_or_far_enough_is_a_trip() -> None:
    slow = drive(0, 320, 12.5, dlon=0.00001, speed=6.0)  # long enough, not far
    _, out = run(slow + park(320, 400, slow[-1].lon))
    assert len(out.trips) == 2 and out.trips[-1].end is not None
    fast = drive(0, 40, 12.5, dlon=0.002, speed=80.0)  # far enough (0.66 km), not long
    _, out = run(fast + park(40, 400, fast[-1].lon))
    assert len(out.trips) == 2 and out.trips[-1].distance_km == pytest.approx(great_circle(fast), rel=1e-4)


def test_a_gap_ends_the_trip_at_the_last_reading_before_it() -> None:
    first = drive(0, 600, 12.5)
    after = drive(600 + 3600, 600, 12.7)
    _, out = run(first + after)
    ended = [r for r in out.trips if r.end is not None]
    assert len(ended) == 1 and ended[0].end == first[-1].time and ended[0].end_lon == first[-1].lon
    assert ended[0].distance_km == pytest.approx(great_circle(first), rel=1e-4)
    assert [(s.start, s.end) for s in out.stops] == [(first[-1].time, None), (first[-1].time, after[0].time)]


def test_a_gps_jump_adds_no_distance() -> None:
    track = drive(0, 600, 12.5)
    jumped = track[:30] + [reading(295, 13.5, 60.0)] + track[30:]
    _, clean = run(track + park(600, 400, track[-1].lon))
    _, out = run(jumped + park(600, 400, track[-1].lon))
    # The two segments through the jump are left out: at most two steps shorter.
    assert 0 < clean.trips[-1].distance_km - out.trips[-1].distance_km < 0.2


def test_ignition_mode_runs_trips_while_the_ignition_is_on() -> None:
    th = MotionThresholds(use_ignition=True)
    on = {"ignition": True}
    off = {"ignition": False}
    warm = [reading(i * 10, 12.5, 0.0, engine=on) for i in range(40)]  # 400 s, engine on, not moving
    _, out = run(warm + [reading(400 + i * 10, 12.5, 0.0, engine=off) for i in range(40)], th)
    assert [(r.start, r.end) for r in out.trips] == [(warm[0].time, None), (warm[0].time, T0 + timedelta(seconds=400))]
    _, plain = run(warm + [reading(400 + i * 10, 12.5, 0.0, engine=off) for i in range(40)])
    assert plain.trips == []


def test_idling_at_a_gate_raises_then_resolves_and_counts_on_the_trip() -> None:
    on = {"ignition": True, "rpm": 800}
    first = drive(0, 600, 12.5, engine=on)
    gate = [reading(600 + i * 10, first[-1].lon, 0.0, engine=on) for i in range(1, 25)]  # 240 s
    second = drive(850, 300, first[-1].lon, engine=on)
    st, out = run(first + gate + second)
    assert [(a.action, a.reading_time) for a in out.idle] == [
        ("raise", gate[0].time + timedelta(seconds=180)), ("resolve", second[0].time)]
    assert out.idle[1].details["idle_s"] == 240.0
    assert st.trip is not None and st.trip.idle_s == 240.0
    assert st.engine_s == pytest.approx((second[-1].time - first[0].time).total_seconds())
    assert len([r for r in out.trips]) == 1  # one trip all along


def test_ignition_from_rpm_and_readings_that_say_nothing() -> None:
    assert ignition_of({"rpm": 900}, None) is True
    assert ignition_of({"rpm": 0}, True) is False
    assert ignition_of({"coolant_temp_c": 90}, True) is True
    assert ignition_of(None, False) is False


def test_late_readings_are_skipped_and_listed() -> None:
    track = drive(0, 600, 12.5)
    st, _ = run(track)
    before = memory_of(st)
    _, out = run([track[5], reading(55, 12.6, 60.0)], st=st)
    assert out.late == [(VID, track[5].time), (VID, T0 + timedelta(seconds=55))]
    assert out.trips == [] and memory_of(st) == before


@pytest.mark.parametrize("cut", [5, 61, 62, 70, 121, 150])
def test_a_run_split_through_its_stored_state_gives_the_same_rows(cut: int) -> None:
    on = {"ignition": True}
    track = (drive(0, 600, 12.5, engine=on, fuel=80.0) + park(600, 700, 12.56, engine=on)
             + drive(1310, 600, 12.56, engine=on, fuel=70.0) + drive(3600 * 2, 300, 12.7))
    _, whole = run(track)
    st, first = run(track[:cut])
    row = {"last_time": st.last_time, "odometer_km": st.odometer_km, "engine_s": st.engine_s, "memory": memory_of(st)}
    _, rest = run(track[cut:], st=state_from_row(row))
    assert first.trips + rest.trips == whole.trips
    assert first.stops + rest.stops == whole.stops
    assert first.idle + rest.idle == whole.idle


def test_a_silent_vehicle_s_trip_is_ended_by_expire_and_the_next_reading_adds_nothing() -> None:
    track = drive(0, 600, 12.5)
    st, _ = run(track)
    out = Changes()
    assert not expire(VID, st, track[-1].time + timedelta(seconds=3599), TH, out)
    assert expire(VID, st, track[-1].time + timedelta(hours=2), TH, out)
    assert [(r.end, r.end_lon) for r in out.trips] == [(track[-1].time, track[-1].lon)]
    assert [(s.start, s.end) for s in out.stops] == [(track[-1].time, None)]
    assert not expire(VID, st, track[-1].time + timedelta(hours=3), TH, Changes())
    _, later = run([reading(3 * 3600, track[-1].lon, 0.0)], st=st)
    assert later.trips == [] and later.stops == []
