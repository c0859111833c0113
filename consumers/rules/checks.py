"""The alert rules, one function each: GPS jumps, overspeed (global and per geofence),
harsh braking and acceleration, fuel (low level, sudden drop while stationary), engine
(overheating, trouble codes).

Pure code: each rule advances one vehicle's :class:`VehicleState` over one reading and
appends the alert actions it decided to ``actions``. A rule only raises what is not
open and only resolves what is, so one alert's actions alternate raise/resolve.
:mod:`fleet_telemetry.consumers.rules.evaluate` calls them only for readings that may
change something.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any
from uuid import UUID

from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import (
    ENGINE_DTC,
    FUEL_DROP,
    GPS_JUMP,
    HARSH_ACCELERATION,
    HARSH_BRAKING,
    LOW_FUEL,
    OVERHEATING,
    OVERSPEED,
    AlertAction,
    Thresholds,
    VehicleState,
)
from fleet_telemetry.consumers.rules.transitions import FenceState, Position
from fleet_telemetry.core.geodesy import plausible_move, sphere_distance_m
from fleet_telemetry.core.reading import Reading

# Speed unknown and moved less than this since the previous reading: stationary.
STATIONARY_DISTANCE_M = 30.0
STATIONARY_DEGREES = STATIONARY_DISTANCE_M / 111_320
# A speed change smaller than this between two readings is never harsh: at the default
# thresholds it would take readings less than half a second apart, where a device's speed
# noise alone makes such changes. It also spares the common reading any time arithmetic.
HARSH_MIN_DELTA_KMH = 5.0
KMH_PER_MPS = 3.6


# --- GPS jumps ---------------------------------------------------------------------


def check_jump(
    vid: UUID, vs: VehicleState, r: Reading, previous: Position, th: Thresholds, actions: list[AlertAction]
) -> tuple[bool, Position | None]:
    """Whether ``r`` is a plausible move from the last accepted position (or from a
    suspect point it confirms); raises and resolves ``gps_jump``. Returns (accepted,
    the position to measure crossings from)."""
    t = r.time
    top = th.max_gps_speed_kmh
    accepted = plausible_move(previous.time, previous.lat, previous.lon, t, r.lat, r.lon, top)
    start: Position | None = previous
    if not accepted and vs.suspect is not None and plausible_move(*vs.suspect, t, r.lat, r.lon, top):
        accepted, start = True, None  # consistent with the suspect point: it really moved
    if accepted:
        vs.suspect = None
        if GPS_JUMP in vs.open:
            vs.open.discard(GPS_JUMP)
            actions.append(AlertAction("resolve", GPS_JUMP, vid, t, {"resolved_at_reading": t.isoformat()}))
        return True, start
    distance = sphere_distance_m(previous.lon, previous.lat, r.lon, r.lat)
    seconds = (t - previous.time).total_seconds()
    vs.suspect = (t, r.lat, r.lon)
    if GPS_JUMP not in vs.open:
        vs.open.add(GPS_JUMP)
        actions.append(AlertAction("raise", GPS_JUMP, vid, t, {
            "from": [previous.lat, previous.lon], "to": [r.lat, r.lon], "distance_m": round(distance, 1),
            "seconds": seconds,
            "implied_speed_kmh": None if seconds <= 0 else round(distance / seconds * 3.6, 1),
        }))
    return False, previous


# --- overspeed ---------------------------------------------------------------------


def check_overspeed(
    vid: UUID, vs: VehicleState, t: datetime, speed: float, index: GeofenceIndex,
    inside: frozenset[int], th: Thresholds, actions: list[AlertAction],
) -> bool:
    """Both overspeed rules; returns whether an episode is still running."""
    # The global limit.
    vs.speeding_since, vs.speeding_max, is_open = _episode(
        vid, None, th.overspeed_kmh, vs.speeding_since, vs.speeding_max, OVERSPEED in vs.open, t, speed, th,
        actions)
    if is_open:
        vs.open.add(OVERSPEED)
    else:
        vs.open.discard(OVERSPEED)

    # Each geofence's own limit, for the fences the reading is in.
    fences = vs.fences
    for fid in inside:
        fence = index.fences.get(fid)
        if fence is None or fence.speed_limit_kmh is None:
            continue
        state = fences.get(fid)
        if state is None:
            state = fences[fid] = FenceState()
        _fence_episode(vid, state, fid, fence.speed_limit_kmh, t, speed, th, actions)
    running = vs.speeding_since is not None
    for fid, state in list(fences.items()):
        if fid not in inside and (state.speeding_since is not None or state.speeding_open):
            _fence_episode(vid, state, fid, math.inf, t, speed, th, actions)
            if state.is_default():
                del fences[fid]
        elif state.speeding_since is not None or state.speeding_open:
            running = True
    return running


def _fence_episode(
    vid: UUID, state: FenceState, fid: int, limit: float, t: datetime, speed: float,
    th: Thresholds, actions: list[AlertAction],
) -> None:
    state.speeding_since, state.speeding_max, state.speeding_open = _episode(
        vid, fid, limit, state.speeding_since, state.speeding_max, state.speeding_open, t, speed, th, actions)


def _episode(
    vid: UUID, fid: int | None, limit: float, since: datetime | None, top: float | None, is_open: bool,
    t: datetime, speed: float, th: Thresholds, actions: list[AlertAction],
) -> tuple[datetime | None, float | None, bool]:
    """One overspeed episode against one limit (a geofence's, or the global one when
    ``fid`` is None): returns its (start, top speed, alert open) after this reading.

    ``overspeed`` is raised once the speed has stayed above the limit for the minimum
    time, and resolved at the first reading at or below it.
    """
    if speed > limit:
        if since is None:
            since, top = t, speed
        elif speed > (top or 0.0):
            top = speed
        if not is_open and (t - since).total_seconds() >= th.overspeed_min_seconds:
            is_open = True
            actions.append(AlertAction("raise", OVERSPEED, vid, t, {
                "limit_kmh": limit, "since": since.isoformat(), "speed_kmh": speed}, fid))
        return since, top, is_open
    if since is None:
        return None, None, is_open
    if is_open:
        actions.append(AlertAction("resolve", OVERSPEED, vid, t, {
            "max_speed_kmh": top, "ended_at": t.isoformat(), "duration_s": (t - since).total_seconds()}, fid))
    return None, None, False


# --- harsh braking and acceleration -------------------------------------------------


def check_harsh(
    vid: UUID, vs: VehicleState, t: datetime, speed: float | None, last_speed: float, th: Thresholds,
    actions: list[AlertAction],
) -> None:
    """``harsh_braking`` and ``harsh_acceleration`` from the speed change since the
    previous reading (at ``vs.last_time``, speed ``last_speed``); call it before
    ``vs.last_time`` moves on, when the change is at least :data:`HARSH_MIN_DELTA_KMH`
    or an episode is running.

    An episode is a run of consecutive reading pairs, at most
    ``behaviour_max_gap_seconds`` apart, whose acceleration passes the same threshold:
    raised at the first pair's later reading, resolved at the first reading that does
    not continue it (a weaker change, a gap, no speed, or the opposite episode), with
    the peak acceleration and the speeds it went from and to.
    """
    last = vs.last_time
    kind: str | None = None
    mps2 = 0.0
    seconds = 0.0
    if speed is not None and last is not None:
        seconds = (t - last).total_seconds()
        if 0 < seconds <= th.behaviour_max_gap_seconds:
            mps2 = (speed - last_speed) / KMH_PER_MPS / seconds
            if mps2 <= -th.harsh_braking_mps2:
                kind = HARSH_BRAKING
            elif mps2 >= th.harsh_acceleration_mps2:
                kind = HARSH_ACCELERATION
    since = vs.harsh_since
    if since is not None:
        running = HARSH_BRAKING if vs.harsh_peak_mps2 < 0 else HARSH_ACCELERATION
        if kind == running:
            if abs(mps2) > abs(vs.harsh_peak_mps2):
                vs.harsh_peak_mps2 = mps2
            return
        assert last is not None
        if running in vs.open:
            vs.open.discard(running)
            actions.append(AlertAction("resolve", running, vid, t, {
                "peak_mps2": round(vs.harsh_peak_mps2, 2), "from_kmh": vs.harsh_from_kmh, "to_kmh": last_speed,
                "ended_at": last.isoformat(), "duration_s": (last - since).total_seconds()}))
        vs.harsh_since, vs.harsh_from_kmh, vs.harsh_peak_mps2 = None, None, 0.0
    if kind is None or last is None:
        return
    vs.harsh_since, vs.harsh_from_kmh, vs.harsh_peak_mps2 = last, last_speed, mps2
    if kind not in vs.open:
        vs.open.add(kind)
        threshold = -th.harsh_braking_mps2 if kind == HARSH_BRAKING else th.harsh_acceleration_mps2
        actions.append(AlertAction("raise", kind, vid, t, {
            "acceleration_mps2": round(mps2, 2), "threshold_mps2": threshold, "speed_before_kmh": last_speed,
            "speed_kmh": speed, "seconds": seconds, "since": last.isoformat()}))


# --- fuel --------------------------------------------------------------------------


def check_fuel(
    vid: UUID, vs: VehicleState, t: datetime, fuel: float, stationary: bool, th: Thresholds,
    actions: list[AlertAction],
) -> None:
    """``low_fuel`` (with hysteresis) and ``fuel_drop`` (resolved by a refuel)."""
    if fuel < th.low_fuel_percent:
        if LOW_FUEL not in vs.open:
            vs.open.add(LOW_FUEL)
            actions.append(AlertAction("raise", LOW_FUEL, vid, t, {
                "fuel_level": fuel, "threshold_percent": th.low_fuel_percent}))
    elif LOW_FUEL in vs.open and fuel >= th.low_fuel_percent + th.fuel_hysteresis_percent:
        vs.open.discard(LOW_FUEL)
        actions.append(AlertAction("resolve", LOW_FUEL, vid, t, {"fuel_level_after": fuel}))

    refuelled = vs.last_fuel is not None and fuel - vs.last_fuel >= th.fuel_hysteresis_percent
    if refuelled and FUEL_DROP in vs.open:
        vs.open.discard(FUEL_DROP)
        actions.append(AlertAction("resolve", FUEL_DROP, vid, t, {"refuelled_to": fuel}))
    vs.last_fuel = fuel
    _fuel_drop(vid, vs, t, fuel, stationary, th, actions)


def _fuel_drop(
    vid: UUID, vs: VehicleState, t: datetime, fuel: float, stationary: bool, th: Thresholds,
    actions: list[AlertAction],
) -> None:
    """Sudden drop while stationary: against the highest level of this stop, inside the window."""
    if not stationary:
        vs.rest_fuel = vs.rest_time = None
        return
    if vs.rest_fuel is None or vs.rest_time is None or fuel >= vs.rest_fuel:
        vs.rest_fuel, vs.rest_time = fuel, t
        return
    if (t - vs.rest_time).total_seconds() > th.fuel_drop_seconds:
        vs.rest_fuel, vs.rest_time = fuel, t  # a slow fall (idling, sensor drift) is no theft
        return
    if vs.rest_fuel - fuel >= th.fuel_drop_percent:
        if FUEL_DROP not in vs.open:
            vs.open.add(FUEL_DROP)
            actions.append(AlertAction("raise", FUEL_DROP, vid, t, {
                "from_percent": vs.rest_fuel, "to_percent": fuel, "since": vs.rest_time.isoformat(),
                "seconds": (t - vs.rest_time).total_seconds()}))
        vs.rest_fuel, vs.rest_time = fuel, t


# --- engine ------------------------------------------------------------------------


def check_engine(
    vid: UUID, vs: VehicleState, t: datetime, engine: dict[str, Any], th: Thresholds,
    actions: list[AlertAction],
) -> None:
    """``overheating`` (with hysteresis) and ``engine_dtc`` (updated with new codes,
    resolved when the codes clear)."""
    coolant = engine.get("coolant_temp_c")
    if isinstance(coolant, (int, float)) and not isinstance(coolant, bool):
        if coolant >= th.overheat_c:
            if OVERHEATING not in vs.open:
                vs.open.add(OVERHEATING)
                actions.append(AlertAction("raise", OVERHEATING, vid, t, {
                    "coolant_temp_c": coolant, "threshold_c": th.overheat_c}))
        elif OVERHEATING in vs.open and coolant <= th.overheat_c - th.overheat_hysteresis_c:
            vs.open.discard(OVERHEATING)
            actions.append(AlertAction("resolve", OVERHEATING, vid, t, {"coolant_temp_c_after": coolant}))

    codes = engine.get("dtc")
    if not isinstance(codes, list) or (vs.dtc is not None and tuple(codes) == vs.dtc):
        return
    current = tuple(sorted({str(c) for c in codes}))
    known = set(vs.dtc or ())
    new = [c for c in current if c not in known]
    vs.dtc = current
    if not current:
        if ENGINE_DTC in vs.open:
            vs.open.discard(ENGINE_DTC)
            actions.append(AlertAction("resolve", ENGINE_DTC, vid, t, {"cleared_at": t.isoformat()}))
        return
    if not new:
        return
    if ENGINE_DTC in vs.open:
        actions.append(AlertAction("update", ENGINE_DTC, vid, t, {"codes": list(current), "new": new}))
    else:
        vs.open.add(ENGINE_DTC)
        actions.append(AlertAction("raise", ENGINE_DTC, vid, t, {"codes": list(current), "new": new}))
