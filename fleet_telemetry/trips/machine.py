"""The trips state machine: one vehicle's readings, in event-time order, into trips,
stops, idling and the odometer and engine hours.

Pure code: :func:`advance` moves a :class:`~fleet_telemetry.trips.model.MotionState`
over new readings and appends what it decided to a
:class:`~fleet_telemetry.trips.model.Changes`. The workers run it live; ``fleet
maintain`` runs it again over the raw rows of a window late readings touched, and gets
the same trips.

- A vehicle is **moving** at or above ``moving_kmh`` (its reported speed, else the speed
  implied by its move since the previous reading); with ``use_ignition``, it is
  *active* while its ignition is on. An active reading with no trip open starts a
  movement there; the movement becomes a trip (``trip.started``, ending the open stop)
  once it lasted ``min_duration_s`` or covered ``min_distance_km``.
- Halted (not active) for ``min_stop_s`` ends the trip at the first halted reading
  (``trip.ended``; a movement that never became a trip is dropped) and starts a stop
  there (``stop.started``) unless one is open.
- No reading for ``gap_s`` ends the trip at the last reading before the gap (or where
  it halted), and starts a stop there: at the next reading, or earlier by
  :func:`expire` (``fleet maintain``) once the vehicle has been silent that long.
- Distances come from the positions; a move the GPS-jump rule finds implausible
  (:func:`fleet_telemetry.core.geodesy.plausible_move`) adds nothing.
- **Idling**: ignition on and not moving. Lasting ``idle_min_s`` raises ``idling``
  (live runs only); it is resolved at the first reading that ends it, and its seconds
  go to the trip (or else the stop) open when it ends.
- The odometer is the device's ``odometer_km`` when it sends one, else the distance
  summed; engine seconds add up the time between readings with the ignition on.
"""

from __future__ import annotations

import math
from datetime import datetime
from uuid import UUID

from fleet_telemetry.core.geodesy import DEGREE_KMH, JUMP_MIN_DEGREES, MEAN_RADIUS_M, plausible_move
from fleet_telemetry.core.reading import Reading
from fleet_telemetry.trips.model import (
    Changes,
    IdleAction,
    MotionState,
    MotionThresholds,
    StopDraft,
    StopRow,
    TripDraft,
    TripRow,
    stop_id,
    trip_id,
)

_KM_PER_RADIAN = MEAN_RADIUS_M / 1000
_RADIANS = math.pi / 180


def ignition_of(engine: dict[str, object] | None, previous: bool | None) -> bool | None:
    """Ignition as a reading reports it (``ignition`` true, or ``rpm`` > 0); readings that
    say nothing keep the previous value."""
    if not engine:
        return previous
    reported = engine.get("ignition")
    rpm = engine.get("rpm")
    if reported is None and rpm is None:
        return previous
    return reported is True or (type(rpm) in (int, float) and float(rpm) > 0)  # type: ignore[arg-type]


def advance(vid: UUID, st: MotionState, readings: list[Reading], th: MotionThresholds, out: Changes,
            *, live: bool = True) -> None:
    """Runs one vehicle's readings (in event-time order) through the machine.

    Readings not newer than ``st.last_time`` are late: listed in ``out.late`` and
    skipped. ``live`` False (a recomputation) raises and resolves no alerts.
    """
    moving_kmh = th.moving_kmh
    gap = th.gap_s
    min_stop = th.min_stop_s
    idle_min = th.idle_min_s
    max_gps = th.max_gps_speed_kmh
    use_ignition = th.use_ignition
    last = st.last_time
    lat0, lon0 = st.lat, st.lon
    ignition = st.ignition
    for r in readings:
        t = r.time
        if last is not None and t <= last:
            if t < last:
                out.late.append((vid, t))
            continue
        lat, lon, speed = r.lat, r.lon, r.speed
        dt = 0.0
        d_km = 0.0
        if last is not None:
            dt = (t - last).total_seconds()
            if dt >= gap:
                _gap(vid, st, t, th, out)
            degrees = abs(lat - lat0) + abs(lon - lon0)
            # The common move passes the GPS-jump test's first two checks: decided here, without the call.
            if degrees and (degrees <= JUMP_MIN_DEGREES or (dt > 0 and degrees * DEGREE_KMH / dt <= max_gps)
                            or plausible_move(last, lat0, lon0, t, lat, lon, max_gps)):
                # Equirectangular: within a millionth of the great circle for moves between readings.
                x = (lon - lon0) * math.cos((lat + lat0) * 0.5 * _RADIANS)
                d_km = math.hypot(x, lat - lat0) * _RADIANS * _KM_PER_RADIAN
        now_ignition = ignition
        engine = r.engine_status
        if engine:  # ignition_of, inline
            reported = engine.get("ignition")
            rpm = engine.get("rpm")
            if reported is not None or rpm is not None:
                kind = type(rpm)
                now_ignition = reported is True or ((kind is int or kind is float) and rpm > 0)  # type: ignore[operator]
        if speed is not None:
            moving = speed >= moving_kmh
        else:
            moving = dt > 0 and d_km / dt * 3600 >= moving_kmh
        active = now_ignition if use_ignition and now_ignition is not None else moving

        # Accumulators.
        odometer_before, engine_before = st.odometer_km, st.engine_s
        if r.odometer_km is not None:
            st.odometer_km = r.odometer_km
        elif d_km:
            st.odometer_km = odometer_before + d_km
        if ignition and dt < gap:
            st.engine_s = engine_before + dt

        # Idling, before the motion: an idling that ends as a trip starts belongs to the stop.
        if now_ignition and not moving:
            since = st.idle_since
            if since is None:
                st.idle_since = t
            elif live and not st.idle_alert and (t - since).total_seconds() >= idle_min:
                st.idle_alert = True
                out.idle.append(IdleAction("raise", vid, t, {"since": since.isoformat(), "lat": lat, "lon": lon,
                                                             "min_seconds": idle_min}))
                out.urgent.add(vid)
        elif st.idle_since is not None:
            _end_idle(vid, st, t, t, th, out)

        # Motion.
        trip = st.trip
        if active:
            st.halt_since = None
            if trip is None:
                trip = st.trip = TripDraft(t, lat, lon, odometer_before, engine_before)
            else:
                trip.distance_km += d_km
            trip.moved_until = t
            if speed is not None and (trip.max_speed is None or speed > trip.max_speed):
                trip.max_speed = speed
            fuel = r.fuel_level
            if fuel is not None:
                if trip.fuel_start is None:
                    trip.fuel_start = fuel
                trip.fuel_last = fuel
            if not trip.confirmed and ((t - trip.start).total_seconds() >= th.min_duration_s
                                       or trip.distance_km >= th.min_distance_km):
                _confirm(vid, st, trip, out)
        else:
            if trip is not None:
                trip.distance_km += d_km
            if st.halt_since is None:
                st.halt_since, st.halt_lat, st.halt_lon = t, lat, lon
                if trip is not None:
                    trip.halt_distance_km = trip.distance_km
            elif (trip is not None or st.stop is None) and (t - st.halt_since).total_seconds() >= min_stop:
                _halted(vid, st, out)
        ignition = now_ignition
        st.ignition = ignition
        last, lat0, lon0 = t, lat, lon
        st.last_time, st.lat, st.lon = t, lat, lon


def expire(vid: UUID, st: MotionState, now: datetime, th: MotionThresholds, out: Changes) -> bool:
    """A vehicle silent for ``gap_s`` at wall-clock ``now``: what its next reading would
    do about the gap, done now (the trip ends at the last reading, a stop starts there, an
    idling ends); returns whether anything changed. The next reading then finds nothing
    left to end."""
    last = st.last_time
    if last is None or (now - last).total_seconds() < th.gap_s:
        return False
    if st.trip is None and st.stop is not None and st.idle_since is None:
        return False
    _gap(vid, st, now, th, out)
    return True


def _confirm(vid: UUID, st: MotionState, trip: TripDraft, out: Changes) -> None:
    """The movement is a trip: it starts, and the open stop ends where it starts."""
    trip.confirmed = True
    stop = st.stop
    if stop is not None:
        out.stops.append(_stop_row(vid, stop, trip.start))
        st.stop = None
    out.trips.append(TripRow(
        trip_id(vid, trip.start), vid, trip.start, trip.lat, trip.lon, None, None, None, None, None, None, None,
        None, 0.0, trip.odometer_km, None, trip.engine_s))
    out.urgent.add(vid)


def _halted(vid: UUID, st: MotionState, out: Changes) -> None:
    """Halted long enough: the trip ends where it halted, a stop starts there."""
    since = st.halt_since
    assert since is not None
    trip = st.trip
    if trip is not None:
        if trip.confirmed:
            out.trips.append(_trip_row(vid, trip, since, st.halt_lat, st.halt_lon, trip.halt_distance_km,
                                       st.odometer_km))
        st.trip = None
    if st.stop is None:
        st.stop = StopDraft(since, st.halt_lat, st.halt_lon)
        out.stops.append(_stop_row(vid, st.stop, None))
    out.urgent.add(vid)


def _gap(vid: UUID, st: MotionState, t: datetime, th: MotionThresholds, out: Changes) -> None:
    """No reading for ``gap_s`` before ``t``: the trip ends at the last reading (or where
    it halted), a stop starts there; an idling ends at the last reading."""
    last = st.last_time
    assert last is not None
    if st.idle_since is not None:
        _end_idle(vid, st, last, t, th, out)
    if st.halt_since is None:
        st.halt_since, st.halt_lat, st.halt_lon = last, st.lat, st.lon
        if st.trip is not None:
            st.trip.halt_distance_km = st.trip.distance_km
    if st.trip is not None or st.stop is None:
        _halted(vid, st, out)


def _end_idle(vid: UUID, st: MotionState, end: datetime, t: datetime, th: MotionThresholds,
              out: Changes) -> None:
    """The idling that began at ``st.idle_since`` ended at ``end`` (seen at reading ``t``)."""
    since = st.idle_since
    assert since is not None
    st.idle_since = None
    seconds = (end - since).total_seconds()
    if st.idle_alert or seconds >= th.idle_min_s:
        into = st.trip if st.trip is not None else st.stop
        if into is not None:
            into.idle_s += seconds
    if st.idle_alert:
        st.idle_alert = False
        out.idle.append(IdleAction("resolve", vid, t, {"idle_s": seconds, "ended_at": end.isoformat()}))
        out.urgent.add(vid)


def _trip_row(vid: UUID, trip: TripDraft, end: datetime, lat: float, lon: float, distance_km: float,
              odometer_km: float) -> TripRow:
    duration = (end - trip.start).total_seconds()
    fuel_used = None if trip.fuel_start is None or trip.fuel_last is None else trip.fuel_start - trip.fuel_last
    return TripRow(
        trip_id(vid, trip.start), vid, trip.start, trip.lat, trip.lon, end, lat, lon, distance_km, duration,
        trip.max_speed, distance_km / duration * 3600 if duration > 0 else None, fuel_used,
        min(trip.idle_s, duration), trip.odometer_km, odometer_km, trip.engine_s)


def _stop_row(vid: UUID, stop: StopDraft, end: datetime | None) -> StopRow:
    duration = None if end is None else (end - stop.start).total_seconds()
    return StopRow(stop_id(vid, stop.start), vid, stop.start, end, stop.lat, stop.lon, duration, stop.idle_s)


def open_rows(vid: UUID, st: MotionState) -> tuple[TripRow | None, StopRow | None]:
    """The rows of the trip (once confirmed) and the stop open in ``st``."""
    trip = st.trip
    row = None
    if trip is not None and trip.confirmed:
        row = TripRow(trip_id(vid, trip.start), vid, trip.start, trip.lat, trip.lon, None, None, None, None, None,
                      None, None, None, 0.0, trip.odometer_km, None, trip.engine_s)
    return row, None if st.stop is None else _stop_row(vid, st.stop, None)
