"""Every rule and the geofence state machines over one batch of stored readings.

:func:`evaluate` is pure: given each vehicle's remembered state, a batch of stored
readings, the geofence index and the thresholds, it returns the new states, the
geofence transitions and the alert actions (raise, resolve, update) in event-time
order.

- **Late data fires nothing.** A reading not newer than the vehicle's newest evaluated
  reading is skipped (and counted); a replay therefore re-raises nothing.
- Inside one batch a vehicle's readings are evaluated in event-time order.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from operator import attrgetter
from uuid import UUID

from fleet_telemetry.consumers.rules.checks import (
    HARSH_MIN_DELTA_KMH,
    STATIONARY_DEGREES,
    check_engine,
    check_fuel,
    check_harsh,
    check_jump,
    check_overspeed,
)
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import GPS_JUMP, OVERHEATING, Evaluation, Thresholds, VehicleState
from fleet_telemetry.consumers.rules.transitions import Position, advance
from fleet_telemetry.core.geodesy import JUMP_MIN_DEGREES
from fleet_telemetry.core.reading import Reading

# Offline alerts raised by another host's clock: look a little wider when resolving.
CLOCK_SKEW = timedelta(seconds=60)

_time_of = attrgetter("time")



def evaluate(
    states: dict[UUID, VehicleState],
    groups: dict[UUID, list[Reading]],
    index: GeofenceIndex,
    th: Thresholds,
    now: datetime,
) -> Evaluation:
    """Runs every rule and the geofence state machines over a batch (pure but for
    ``states``, which it advances in place).

    ``states`` holds the state of every vehicle in ``groups`` (a fresh
    :class:`VehicleState` for one never seen). ``now`` is the wall-clock time, used only
    to decide whether a reading is fresh enough to resolve an ``offline`` alert.
    """
    out = Evaluation()
    actions, transitions, evaluated = out.actions, out.transitions, out.states
    fresh_after = now - timedelta(seconds=th.offline_seconds)
    stale_before = fresh_after + CLOCK_SKEW if th.offline_seconds else None
    for vid, rs in groups.items():
        vs = states[vid]
        last = vs.last_time
        if len(rs) > 1 or (last is not None and rs[0].time <= last):
            rs = _unevaluated(rs, last, out)
            if not rs:
                continue
        events = len(actions) + len(transitions)
        had_fences = bool(vs.fences)
        _vehicle(vid, vs, rs, index, th, out)
        evaluated[vid] = vs
        if len(actions) + len(transitions) != events:
            out.urgent.add(vid)
        if had_fences or vs.fences:
            out.fences_changed.add(vid)
        if stale_before is not None and last is not None and last < stale_before and rs[-1].time >= fresh_after:
            out.back_online.append(vid)
            out.urgent.add(vid)
    return out


def _unevaluated(rs: list[Reading], last: datetime | None, out: Evaluation) -> list[Reading]:
    """One vehicle's readings newer than ``last``, in event-time order; counts the others as late."""
    if len(rs) > 1:
        rs = sorted(rs, key=_time_of)
    if last is None or rs[0].time > last:
        return rs
    todo = [r for r in rs if r.time > last]
    out.late += len(rs) - len(todo)
    return todo


def _vehicle(vid: UUID, vs: VehicleState, rs: list[Reading], index: GeofenceIndex, th: Thresholds,
             out: Evaluation) -> None:
    """One vehicle's new readings through every rule, in event-time order.

    The hot loop of the workers: the common reading (nothing near a threshold) costs a
    few comparisons; the rules' bookkeeping lives in :mod:`.checks`, called only when
    a reading may change something.
    """
    actions = out.actions
    transitions = out.transitions
    use_fences = bool(index.fences)
    dwell = th.dwell_seconds
    speed_limit = th.overspeed_kmh
    max_gps_speed = th.max_gps_speed_kmh
    low_fuel = th.low_fuel_percent
    refuel = th.fuel_hysteresis_percent
    overheat = th.overheat_c
    stationary_kmh = th.stationary_kmh
    harsh_gap = timedelta(seconds=th.behaviour_max_gap_seconds)
    min_delta = HARSH_MIN_DELTA_KMH
    last_time = vs.last_time
    for r in rs:
        t = r.time
        lat, lon, speed = r.lat, r.lon, r.speed
        previous = vs.position

        # Where the vehicle is: an implausible GPS jump is flagged, and the vehicle does not move there.
        accepted = True
        if previous is not None:
            degrees = abs(lat - previous.lat) + abs(lon - previous.lon)
            if vs.suspect is not None or (degrees > JUMP_MIN_DEGREES and not (
                    # a move check_jump accepts at first sight, with no jump alert to resolve
                    GPS_JUMP not in vs.open and (seconds := (t - previous.time).total_seconds()) > 0
                    and degrees * 111_320 / seconds * 3.6 <= max_gps_speed)):
                accepted, previous = check_jump(vid, vs, r, previous, th, actions)
        if accepted:
            if use_fences or vs.fences:
                here = advance(vid, vs.fences, index, previous, t, lat, lon, dwell, transitions)
            else:
                here = Position(t, lat, lon)
            stationary = (speed <= stationary_kmh if speed is not None else
                          previous is not None and abs(lat - previous.lat) + abs(lon - previous.lon)
                          < STATIONARY_DEGREES)
            vs.position = here
        else:
            here = previous if previous is not None else Position(t, lat, lon)
            stationary = speed is not None and speed <= stationary_kmh

        # What it reports: each rule only when the reading may change something.
        if speed is not None and (vs.episodes or speed > speed_limit
                                  or (here.inside and speed > index.lowest_limit(here.inside))):
            vs.episodes = check_overspeed(vid, vs, t, speed, index, here.inside, th, actions)
        last_speed = vs.last_speed
        if last_speed is not None and (vs.harsh_since is not None or (
                speed is not None and not -min_delta < speed - last_speed < min_delta
                and last_time is not None and t - last_time <= harsh_gap)):
            check_harsh(vid, vs, t, speed, last_speed, th, actions)
        vs.last_speed = speed
        fuel = r.fuel_level
        if fuel is not None:
            last_fuel = vs.last_fuel
            if (fuel < low_fuel or stationary or vs.open or vs.rest_fuel is not None or last_fuel is None
                    or fuel - last_fuel >= refuel):
                check_fuel(vid, vs, t, fuel, stationary, th, actions)
            else:
                vs.last_fuel = fuel
        engine = r.engine_status
        if engine:
            coolant = engine.get("coolant_temp_c")
            codes = engine.get("dtc")
            if ((coolant is not None and (OVERHEATING in vs.open or not isinstance(coolant, (int, float))
                                          or coolant >= overheat))
                    or (codes is not None and (vs.dtc is None or tuple(codes) != vs.dtc))):
                check_engine(vid, vs, t, engine, th, actions)
        if r.odometer_km is not None:
            vs.odometer_km = r.odometer_km
        vs.last_time = last_time = t
