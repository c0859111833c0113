"""Alert rules and geofence transitions, evaluated in the consumer workers.

:func:`evaluate` is pure: given each vehicle's remembered state, a batch of stored
readings, the geofence index and the thresholds, it returns the new states, the
geofence transitions and the alert actions (raise, resolve, update) in event-time
order. :class:`RuleEngine` does the I/O around it, once per batch: load the states of
vehicles it has not seen yet (one query), evaluate, then write states, transitions and
alerts in one transaction (a handful of set-based statements). It also runs the timer
task of the worker: the geofence refresh, the offline check and the maintenance check.

Guarantees (schema/README.md, "Geofences and alerts"):

- **No spam by construction.** An alert is raised with ``INSERT ... ON CONFLICT DO
  NOTHING`` against ``alerts_one_open``: at most one open alert per vehicle, type and
  geofence, whoever raises it. Transitions have a unique identity too.
- **Late data fires nothing.** A reading not newer than the vehicle's newest evaluated
  reading is stored (by the sink) but skipped here; a replay therefore re-raises nothing.
  Inside one batch a vehicle's readings are evaluated in event-time order.
- **Idempotent under redelivery and rebalancing.** A state row is updated only if it
  still holds the ``last_time`` this worker read; otherwise the batch's writes roll
  back, the vehicle's state is read again and the batch is evaluated once more. Readings
  stored but never evaluated (a crash between the two commits) are picked up from
  ``vehicle_telemetry`` when the vehicle's state is next loaded.
"""

from __future__ import annotations

import asyncio
import math
from operator import attrgetter
import time as monotonic_clock
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
import structlog

from fleet_telemetry.consumers.geofence import (
    FenceState,
    GeofenceIndex,
    InvalidGeofence,
    Position,
    Transition,
    advance,
    make_geofence,
    polygons_from_wkb,
    sphere_distance_m,
)
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.rules")

# Alert types (alerts.type) and their severities.
OVERSPEED = "overspeed"
LOW_FUEL = "low_fuel"
FUEL_DROP = "fuel_drop"
ENGINE_DTC = "engine_dtc"
OVERHEATING = "overheating"
OFFLINE = "offline"
MAINTENANCE_DUE = "maintenance_due"
GPS_JUMP = "gps_jump"
SEVERITY = {
    OVERSPEED: "warning", LOW_FUEL: "warning", FUEL_DROP: "critical", ENGINE_DTC: "warning",
    OVERHEATING: "critical", OFFLINE: "warning", MAINTENANCE_DUE: "info", GPS_JUMP: "warning",
}
ALERT_TYPES = tuple(SEVERITY)

# A move shorter than this is never a GPS jump, whatever the time between the readings.
JUMP_MIN_DISTANCE_M = 250.0
_JUMP_MIN_DEGREES = JUMP_MIN_DISTANCE_M / 111_320 / 1.5
# Speed unknown and moved less than this since the previous reading: stationary.
STATIONARY_DISTANCE_M = 30.0
_STATIONARY_DEGREES = STATIONARY_DISTANCE_M / 111_320
# How far back readings stored but never evaluated are picked up (see RuleEngine).
CATCH_UP = timedelta(hours=1)
# States without transitions or alerts are written at most this often (write-behind;
# a tenth of the offline threshold if that is shorter).
STATE_FLUSH_SECONDS = 15.0
# Offline alerts raised by another host's clock: look a little wider when resolving.
CLOCK_SKEW = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The rules' settings (``FLEET_ALERT_*``, ``FLEET_GEOFENCE_DWELL_SECONDS``)."""

    dwell_seconds: float = 20.0
    overspeed_kmh: float = 120.0
    overspeed_min_seconds: float = 20.0
    low_fuel_percent: float = 10.0
    fuel_hysteresis_percent: float = 5.0
    fuel_drop_percent: float = 8.0
    fuel_drop_seconds: float = 900.0
    stationary_kmh: float = 3.0
    overheat_c: float = 105.0
    overheat_hysteresis_c: float = 5.0
    offline_seconds: float = 900.0
    max_gps_speed_kmh: float = 300.0

    @classmethod
    def from_settings(cls, s: Settings) -> "Thresholds":
        return cls(
            dwell_seconds=s.geofence_dwell_seconds, overspeed_kmh=s.alert_overspeed_kmh,
            overspeed_min_seconds=s.alert_overspeed_min_seconds, low_fuel_percent=s.alert_low_fuel_percent,
            fuel_hysteresis_percent=s.alert_fuel_hysteresis_percent, fuel_drop_percent=s.alert_fuel_drop_percent,
            fuel_drop_seconds=s.alert_fuel_drop_seconds, stationary_kmh=s.alert_stationary_kmh,
            overheat_c=s.alert_overheat_c, overheat_hysteresis_c=s.alert_overheat_hysteresis_c,
            offline_seconds=s.alert_offline_seconds, max_gps_speed_kmh=s.alert_max_gps_speed_kmh,
        )


@dataclass(frozen=True, slots=True)
class AlertAction:
    """``raise`` opens an alert, ``resolve`` closes the open one, ``update`` merges details."""

    action: str
    type: str
    vehicle_id: UUID
    reading_time: datetime
    details: dict[str, Any]
    geofence_id: int | None = None

    @property
    def key(self) -> tuple[UUID, str, int]:
        return (self.vehicle_id, self.type, self.geofence_id or 0)


@dataclass(slots=True)
class VehicleState:
    """What the rules remember about one vehicle (a ``vehicle_rule_state`` row and its
    ``vehicle_geofence_state`` rows)."""

    last_time: datetime | None = None
    """Newest evaluated reading; the row's version."""
    position: Position | None = None
    """Last accepted position (a GPS jump does not move it)."""
    odometer_km: float | None = None
    speeding_since: datetime | None = None
    speeding_max: float | None = None
    rest_fuel: float | None = None
    rest_time: datetime | None = None
    last_fuel: float | None = None
    dtc: tuple[str, ...] | None = None
    suspect: tuple[datetime, float, float] | None = None
    open: set[str] = field(default_factory=set)
    """Vehicle-level alert types this evaluator raised and has not resolved."""
    episodes: bool = True
    """An overspeed episode (global or in a fence) may be running; not stored."""
    fences: dict[int, FenceState] = field(default_factory=dict)

    def memory(self) -> dict[str, Any]:
        """The ``memory`` column: everything but the columns of their own."""
        def t(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()
        return {
            "pos_time": t(self.position.time) if self.position else None,
            "speeding_since": t(self.speeding_since), "speeding_max": self.speeding_max,
            "rest_fuel": self.rest_fuel, "rest_time": t(self.rest_time), "last_fuel": self.last_fuel,
            "dtc": None if self.dtc is None else list(self.dtc),
            "suspect": None if self.suspect is None else [t(self.suspect[0]), self.suspect[1], self.suspect[2]],
            "open": sorted(self.open),
        }

    @classmethod
    def from_row(cls, row: Any, fences: dict[int, FenceState], index: GeofenceIndex) -> "VehicleState":
        m = row["memory"] or {}

        def t(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value)
        position = None
        if row["lat"] is not None and row["lon"] is not None:
            lat, lon = row["lat"], row["lon"]
            position = Position(t(m.get("pos_time")) or row["last_time"], lat, lon, index.containing(lon, lat))
        suspect = m.get("suspect")
        return cls(
            last_time=row["last_time"], position=position, odometer_km=row["odometer_km"],
            speeding_since=t(m.get("speeding_since")), speeding_max=m.get("speeding_max"),
            rest_fuel=m.get("rest_fuel"), rest_time=t(m.get("rest_time")), last_fuel=m.get("last_fuel"),
            dtc=None if m.get("dtc") is None else tuple(m["dtc"]),
            suspect=None if suspect is None else (datetime.fromisoformat(suspect[0]), suspect[1], suspect[2]),
            open=set(m.get("open") or ()), fences=fences,
        )


@dataclass
class Evaluation:
    """What one batch changed."""

    states: dict[UUID, VehicleState] = field(default_factory=dict)
    """The vehicles that had readings to evaluate (their states, changed in place)."""
    urgent: set[UUID] = field(default_factory=set)
    """Vehicles with transitions or alert actions: their state is written with them."""
    fences_changed: set[UUID] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)
    actions: list[AlertAction] = field(default_factory=list)
    back_online: list[UUID] = field(default_factory=list)
    """Vehicles that may have an open offline alert for this batch to resolve."""
    late: int = 0


def by_vehicle(readings: Iterable[Reading]) -> dict[UUID, list[Reading]]:
    """A batch's readings grouped per vehicle, in arrival order."""
    groups: dict[UUID, list[Reading]] = {}
    for r in readings:
        group = groups.get(r.vehicle_id)
        if group is None:
            groups[r.vehicle_id] = [r]
        else:
            group.append(r)
    return groups


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
    fresh_after = now - timedelta(seconds=th.offline_seconds)
    for vid, rs in groups.items():
        vs = states[vid]
        if len(rs) > 1:
            rs = sorted(rs, key=_time_of)
        last = vs.last_time
        if last is not None and rs[0].time <= last:
            todo = [r for r in rs if r.time > last]
            out.late += len(rs) - len(todo)
            if not todo:
                continue
        else:
            todo = rs
        events = len(out.actions) + len(out.transitions)
        had_fences = bool(vs.fences)
        _vehicle(vid, vs, todo, index, th, out)
        out.states[vid] = vs
        if len(out.actions) + len(out.transitions) != events:
            out.urgent.add(vid)
        if had_fences or vs.fences:
            out.fences_changed.add(vid)
        if (th.offline_seconds and last is not None and last < fresh_after + CLOCK_SKEW
                and todo[-1].time >= fresh_after):
            out.back_online.append(vid)
            out.urgent.add(vid)
    return out


def _vehicle(vid: UUID, vs: VehicleState, rs: list[Reading], index: GeofenceIndex, th: Thresholds,
             out: Evaluation) -> None:
    """One vehicle's new readings through every rule, in event-time order.

    The hot loop of the workers: the common reading (nothing near a threshold) costs a
    few comparisons; the rules' bookkeeping lives in the helpers it calls when needed.
    """
    actions = out.actions
    transitions = out.transitions
    use_fences = bool(index.fences)
    dwell = th.dwell_seconds
    lowest_limit = min(th.overspeed_kmh, index.lowest_speed_limit)
    low_fuel = th.low_fuel_percent
    refuel = th.fuel_hysteresis_percent
    overheat = th.overheat_c
    stationary_kmh = th.stationary_kmh
    for r in rs:
        t = r.time
        lat, lon, speed = r.lat, r.lon, r.speed
        previous = vs.position

        # Implausible GPS jump: flagged, and the vehicle does not move there.
        accepted = True
        if previous is not None and (vs.suspect is not None
                                     or abs(lat - previous.lat) + abs(lon - previous.lon) > _JUMP_MIN_DEGREES):
            accepted, previous = _jump(vid, vs, r, previous, th, actions)
        if accepted:
            if use_fences or vs.fences:
                here = advance(vid, vs.fences, index, previous, t, lat, lon, dwell, transitions)
            else:
                here = Position(t, lat, lon)
            stationary = (speed <= stationary_kmh if speed is not None else
                          previous is not None and abs(lat - previous.lat) + abs(lon - previous.lon)
                          < _STATIONARY_DEGREES)
            vs.position = here
        else:
            here = previous if previous is not None else Position(t, lat, lon)
            stationary = speed is not None and speed <= stationary_kmh

        if speed is not None and (speed > lowest_limit or vs.episodes):
            vs.episodes = _overspeed(vid, vs, t, speed, index, here.inside, th, actions)
        fuel = r.fuel_level
        if fuel is not None:
            last_fuel = vs.last_fuel
            if (fuel < low_fuel or stationary or vs.open or vs.rest_fuel is not None or last_fuel is None
                    or fuel - last_fuel >= refuel):
                _fuel(vid, vs, t, fuel, stationary, th, actions)
            else:
                vs.last_fuel = fuel
        engine = r.engine_status
        if engine:
            coolant = engine.get("coolant_temp_c")
            codes = engine.get("dtc")
            if ((coolant is not None and (OVERHEATING in vs.open or not isinstance(coolant, (int, float))
                                          or coolant >= overheat))
                    or (codes is not None and (vs.dtc is None or tuple(codes) != vs.dtc))):
                _engine(vid, vs, t, engine, th, actions)
        if r.odometer_km is not None:
            vs.odometer_km = r.odometer_km
        vs.last_time = t


def _jump(
    vid: UUID, vs: VehicleState, r: Reading, previous: Position, th: Thresholds, actions: list[AlertAction]
) -> tuple[bool, Position | None]:
    """Whether ``r`` is a plausible move from the last accepted position (or from a
    suspect point it confirms); raises and resolves ``gps_jump``. Returns (accepted,
    the position to measure crossings from)."""
    t = r.time
    accepted = _plausible(previous.time, previous.lat, previous.lon, r, th)
    start: Position | None = previous
    if not accepted and vs.suspect is not None and _plausible(*vs.suspect, r, th):
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


def _plausible(t0: datetime, lat0: float, lon0: float, r: Reading, th: Thresholds) -> bool:
    degrees = abs(r.lat - lat0) + abs(r.lon - lon0)
    if degrees <= _JUMP_MIN_DEGREES:
        return True  # closer than JUMP_MIN_DISTANCE_M whatever the latitude
    seconds = (r.time - t0).total_seconds()
    if seconds > 0 and degrees * 111_320 / seconds * 3.6 <= th.max_gps_speed_kmh:
        return True  # an upper bound of the distance is plausible already
    distance = sphere_distance_m(lon0, lat0, r.lon, r.lat)
    if distance <= JUMP_MIN_DISTANCE_M:
        return True
    return seconds > 0 and distance / seconds * 3.6 <= th.max_gps_speed_kmh


def _overspeed(
    vid: UUID, vs: VehicleState, t: datetime, speed: float, index: GeofenceIndex,
    inside: frozenset[int], th: Thresholds, actions: list[AlertAction],
) -> bool:
    """Both overspeed rules; returns whether an episode is still running."""
    # The global limit.
    if speed > th.overspeed_kmh:
        if vs.speeding_since is None:
            vs.speeding_since, vs.speeding_max = t, speed
        elif speed > (vs.speeding_max or 0.0):
            vs.speeding_max = speed
        if OVERSPEED not in vs.open and (t - vs.speeding_since).total_seconds() >= th.overspeed_min_seconds:
            vs.open.add(OVERSPEED)
            actions.append(AlertAction("raise", OVERSPEED, vid, t, {
                "limit_kmh": th.overspeed_kmh, "since": vs.speeding_since.isoformat(), "speed_kmh": speed}))
    elif vs.speeding_since is not None:
        if OVERSPEED in vs.open:
            vs.open.discard(OVERSPEED)
            actions.append(AlertAction("resolve", OVERSPEED, vid, t, {
                "max_speed_kmh": vs.speeding_max, "ended_at": t.isoformat(),
                "duration_s": (t - vs.speeding_since).total_seconds()}))
        vs.speeding_since = vs.speeding_max = None

    # Each geofence's own limit, for the fences the reading is in.
    fences = vs.fences
    for fid in inside:
        fence = index.fences.get(fid)
        if fence is None or fence.speed_limit_kmh is None:
            continue
        state = fences.get(fid)
        if state is None:
            state = fences[fid] = FenceState()
        _fence_speed(vid, state, fid, fence.speed_limit_kmh, t, speed, th, actions)
    running = vs.speeding_since is not None
    for fid, state in list(fences.items()):
        if fid not in inside and (state.speeding_since is not None or state.speeding_open):
            _fence_speed(vid, state, fid, math.inf, t, speed, th, actions)
            if state.is_default():
                del fences[fid]
        elif state.speeding_since is not None or state.speeding_open:
            running = True
    return running


def _fence_speed(
    vid: UUID, state: FenceState, fid: int, limit: float, t: datetime, speed: float,
    th: Thresholds, actions: list[AlertAction],
) -> None:
    if speed > limit:
        if state.speeding_since is None:
            state.speeding_since, state.speeding_max = t, speed
        elif speed > (state.speeding_max or 0.0):
            state.speeding_max = speed
        if not state.speeding_open and (t - state.speeding_since).total_seconds() >= th.overspeed_min_seconds:
            state.speeding_open = True
            actions.append(AlertAction("raise", OVERSPEED, vid, t, {
                "limit_kmh": limit, "since": state.speeding_since.isoformat(), "speed_kmh": speed}, fid))
        return
    if state.speeding_open:
        state.speeding_open = False
        assert state.speeding_since is not None
        actions.append(AlertAction("resolve", OVERSPEED, vid, t, {
            "max_speed_kmh": state.speeding_max, "ended_at": t.isoformat(),
            "duration_s": (t - state.speeding_since).total_seconds()}, fid))
    state.speeding_since = state.speeding_max = None


def _fuel(
    vid: UUID, vs: VehicleState, t: datetime, fuel: float, stationary: bool, th: Thresholds,
    actions: list[AlertAction],
) -> None:
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

    # Sudden drop while stationary: against the highest level of this stop, inside the window.
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


def _engine(
    vid: UUID, vs: VehicleState, t: datetime, engine: dict[str, Any], th: Thresholds,
    actions: list[AlertAction],
) -> None:
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


# --- writing a batch's outcome ------------------------------------------------------


@dataclass
class AlertRows:
    """A batch's alert actions reduced to three set-based statements."""

    resolves: list[AlertAction] = field(default_factory=list)
    """Close the alert opened by an earlier batch."""
    updates: list[AlertAction] = field(default_factory=list)
    """Merge details into the alert opened by an earlier batch."""
    inserts: list[tuple[AlertAction, AlertAction | None]] = field(default_factory=list)
    """(raise, its resolve in this same batch or None)."""


def plan_alert_rows(actions: Sequence[AlertAction]) -> AlertRows:
    """Orders a batch's actions per (vehicle, type, geofence) into rows to write.

    The actions of one key alternate raise/resolve (the rules only raise what is not
    open); an alert raised and resolved inside the batch becomes one resolved row.
    """
    rows = AlertRows()
    raised: dict[tuple[UUID, str, int], int] = {}
    for action in actions:
        key = action.key
        if action.action == "raise":
            raised[key] = len(rows.inserts)
            rows.inserts.append((action, None))
        elif key in raised:
            i = raised[key]
            opened, closing = rows.inserts[i]
            if action.action == "resolve":
                rows.inserts[i] = (opened, action)
                del raised[key]
            else:
                rows.inserts[i] = (replace(opened, details={**opened.details, **action.details}), closing)
        elif action.action == "resolve":
            rows.resolves.append(action)
        else:
            rows.updates.append(action)
    return rows


_LOAD_STATES = """
SELECT vehicle_id, last_time, lat, lon, odometer_km, memory
FROM vehicle_rule_state WHERE vehicle_id = ANY($1::uuid[])
"""
_LOAD_FENCE_STATES = """
SELECT vehicle_id, geofence_id, inside, since, pending_since, pending_lat, pending_lon,
       speeding_since, speeding_max, speeding_open
FROM vehicle_geofence_state WHERE vehicle_id = ANY($1::uuid[])
"""
_CATCH_UP = """
SELECT u.v AS vehicle_id, t.time, ST_Y(t.location) AS lat, ST_X(t.location) AS lon, t.speed, t.fuel_level,
       t.heading, t.odometer_km, t.engine_status
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(v, after, before)
CROSS JOIN LATERAL (
    SELECT * FROM vehicle_telemetry
    WHERE vehicle_id = u.v AND time > u.after AND time < u.before AND time >= $4::timestamptz
    ORDER BY time DESC LIMIT 500
) AS t
"""
_UPDATE_STATES = """
UPDATE vehicle_rule_state AS s
SET last_time = u.t, lat = u.lat, lon = u.lon, odometer_km = u.odo, memory = u.memory, updated_at = now()
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::float8[], $5::float8[], $6::float8[],
            $7::jsonb[]) AS u(v, expected, t, lat, lon, odo, memory)
WHERE s.vehicle_id = u.v AND s.last_time = u.expected
RETURNING s.vehicle_id
"""
_INSERT_STATES = """
INSERT INTO vehicle_rule_state (vehicle_id, last_time, lat, lon, odometer_km, memory)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[], $6::jsonb[])
ON CONFLICT (vehicle_id) DO NOTHING
RETURNING vehicle_id
"""
_DELETE_FENCE_STATES = "DELETE FROM vehicle_geofence_state WHERE vehicle_id = ANY($1::uuid[])"
_INSERT_FENCE_STATES = """
INSERT INTO vehicle_geofence_state (vehicle_id, geofence_id, inside, since, pending_since, pending_lat,
                                    pending_lon, speeding_since, speeding_max, speeding_open)
SELECT u.* FROM unnest($1::uuid[], $2::int8[], $3::bool[], $4::timestamptz[], $5::timestamptz[], $6::float8[],
                       $7::float8[], $8::timestamptz[], $9::float8[], $10::bool[])
       AS u(v, f, inside, since, ps, plat, plon, ss, smax, sopen)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f)
"""
_INSERT_TRANSITIONS = """
INSERT INTO geofence_transitions (vehicle_id, geofence_id, kind, time, lat, lon, crossing)
SELECT u.* FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::timestamptz[], $5::float8[], $6::float8[],
                       $7::bool[]) AS u(v, f, kind, t, lat, lon, crossing)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f)
ON CONFLICT (vehicle_id, geofence_id, time, kind) DO NOTHING
RETURNING kind
"""
_RESOLVE = """
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now(), details = a.details || u.details
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::jsonb[]) AS u(v, type, f, details)
WHERE a.entity_id = u.v AND a.type = u.type AND coalesce(a.geofence_id, 0) = u.f AND NOT a.is_resolved
RETURNING a.type
"""
_UPDATE_DETAILS = """
UPDATE alerts AS a
SET details = a.details || u.details
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::jsonb[]) AS u(v, type, f, details)
WHERE a.entity_id = u.v AND a.type = u.type AND coalesce(a.geofence_id, 0) = u.f AND NOT a.is_resolved
"""
_RAISE = """
INSERT INTO alerts (entity_id, type, severity, geofence_id, reading_time, details, is_resolved, resolved_at)
SELECT v, type, severity, f, t, details, closed, CASE WHEN closed THEN now() END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[], $6::jsonb[], $7::bool[])
     AS u(v, type, severity, f, t, details, closed)
WHERE f IS NULL OR EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved DO NOTHING
RETURNING type, is_resolved
"""
_RESOLVE_BACK_ONLINE = """
UPDATE alerts
SET is_resolved = true, resolved_at = now(),
    details = details || jsonb_build_object('back_at', u.t)
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(v, t)
WHERE entity_id = u.v AND type = 'offline' AND NOT is_resolved AND reading_time < u.t
RETURNING type
"""
_RAISE_OFFLINE = """
INSERT INTO alerts (entity_id, type, severity, reading_time, details)
SELECT s.vehicle_id, 'offline', $2, s.last_time,
       jsonb_build_object('last_seen', s.last_time, 'silent_seconds_threshold', $1::float8)
FROM vehicle_rule_state AS s
JOIN vehicles AS v ON v.id = s.vehicle_id AND v.deleted_at IS NULL
WHERE s.last_time < now() - make_interval(secs => $1::float8)
  AND NOT EXISTS (SELECT 1 FROM alerts a
                  WHERE a.entity_id = s.vehicle_id AND a.type = 'offline' AND NOT a.is_resolved)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved DO NOTHING
RETURNING type
"""
# A reading newer than the alert that was committed while the timer raised it.
_RESOLVE_OFFLINE_RACE = """
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now(), details = a.details || jsonb_build_object('back_at', s.last_time)
FROM vehicle_rule_state AS s
WHERE a.type = 'offline' AND NOT a.is_resolved AND s.vehicle_id = a.entity_id
  AND s.last_time > a.reading_time AND s.last_time >= now() - make_interval(secs => $1::float8)
RETURNING a.type
"""
_DUE = """
SELECT t.vehicle_id, max(s.last_time) AS last_time, max(s.odometer_km) AS odometer_km,
       jsonb_agg(jsonb_build_object('schedule_id', t.schedule_id, 'schedule', m.name,
                                    'next_due_km', t.next_due_km, 'next_due_date', t.next_due_date)
                 ORDER BY m.name) AS due
FROM maintenance_triggers AS t
JOIN maintenance_schedules AS m ON m.id = t.schedule_id
JOIN vehicles AS v ON v.id = t.vehicle_id AND v.deleted_at IS NULL
LEFT JOIN vehicle_rule_state AS s ON s.vehicle_id = t.vehicle_id
WHERE t.is_active
  AND (t.next_due_date <= current_date OR (t.next_due_km IS NOT NULL AND s.odometer_km >= t.next_due_km))
GROUP BY t.vehicle_id
"""
_RAISE_DUE = f"""
WITH due AS ({_DUE})
INSERT INTO alerts (entity_id, type, severity, reading_time, details)
SELECT vehicle_id, 'maintenance_due', $1, last_time, jsonb_build_object('odometer_km', odometer_km, 'due', due)
FROM due
WHERE NOT EXISTS (SELECT 1 FROM alerts a
                  WHERE a.entity_id = due.vehicle_id AND a.type = 'maintenance_due' AND NOT a.is_resolved)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved DO NOTHING
RETURNING type
"""
_RESOLVE_DUE = f"""
WITH due AS ({_DUE})
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now()
WHERE a.type = 'maintenance_due' AND NOT a.is_resolved
  AND NOT EXISTS (SELECT 1 FROM due WHERE due.vehicle_id = a.entity_id)
RETURNING a.type
"""
_FENCES_VERSION = "SELECT count(*) AS n, max(updated_at) AS changed FROM geofences"
_LOAD_FENCES = """
SELECT id, name, kind, ST_AsBinary(area) AS area, ST_X(center) AS lon, ST_Y(center) AS lat, radius_m,
       speed_limit_kmh, dwell_seconds
FROM geofences WHERE is_active AND deleted_at IS NULL
"""


def geofence_key(geofence_id: int) -> str:
    """The Redis GEO set of the vehicles inside a geofence (schema/README.md)."""
    return f"geofence:{geofence_id}"


async def load_index(conn: asyncpg.Connection) -> GeofenceIndex:
    """The active geofences, indexed. A row that cannot be used is logged and skipped."""
    fences = []
    for row in await conn.fetch(_LOAD_FENCES):
        try:
            fences.append(make_geofence(
                row["id"], row["name"], row["kind"],
                polygons=None if row["area"] is None else polygons_from_wkb(bytes(row["area"])),
                center=None if row["lon"] is None else (row["lon"], row["lat"]), radius_m=row["radius_m"],
                speed_limit_kmh=row["speed_limit_kmh"], dwell_seconds=row["dwell_seconds"],
            ))
        except InvalidGeofence as exc:
            log.warning("geofence skipped", geofence_id=row["id"], reason=str(exc))
    return GeofenceIndex(fences)


class _Conflict(Exception):
    def __init__(self, vehicles: set[UUID]) -> None:
        super().__init__(f"{len(vehicles)} vehicle states changed under us")
        self.vehicles = vehicles


class RuleEngine:
    """Evaluates each stored batch of one worker; owns the worker's timer task.

    ``after_write`` is the :class:`~fleet_telemetry.consumers.batch.BatchProcessor` hook: it blocks until
    the batch's states, transitions and alerts are committed (one transaction) and
    raises asyncpg errors, which the worker treats like any write failure. The Redis
    ``geofence:{id}`` sets are updated after the commit, best effort.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | None,
        settings: Settings,
        metrics: PipelineMetrics,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._settings = settings
        self._th = Thresholds.from_settings(settings)
        self._metrics = metrics
        self.index = GeofenceIndex(())
        self._index_version: tuple[int, datetime | None] | None = None
        self._states: dict[UUID, VehicleState] = {}
        """Every vehicle this worker evaluated, as it stands after its last batch."""
        self._persisted: dict[UUID, datetime | None] = {}
        """``vehicle_rule_state.last_time`` as this worker last read or wrote it (None: no row)."""
        self._dirty: set[UUID] = set()
        self._fences_dirty: set[UUID] = set()
        self._flushed = monotonic_clock.monotonic()
        # The offline timer reads last_time from the table: keep it well within the threshold.
        offline = self._th.offline_seconds
        self._flush_seconds = min(STATE_FLUSH_SECONDS, offline / 10) if offline else STATE_FLUSH_SECONDS
        self._lock = asyncio.Lock()
        """One batch or flush at a time: the timers flush too."""
        self._timer: asyncio.Task[None] | None = None
        for kind in ALERT_TYPES:
            for action in ("raised", "resolved"):
                metrics.alerts.labels(type=kind, action=action)

    async def start(self) -> None:
        """Loads the geofences and starts the timer task; raises asyncpg errors."""
        await self.refresh_geofences()
        self._timer = asyncio.create_task(self._run_timers(), name="fleet-rule-timers")

    async def stop(self) -> None:
        """Stops the timers and writes the states not written yet: best effort, 10 s at
        most (what is not written is caught up from ``vehicle_telemetry`` by the next owner)."""
        if self._timer is not None:
            self._timer.cancel()
            try:
                await self._timer
            except (asyncio.CancelledError, Exception):
                pass
            self._timer = None
        try:
            await asyncio.wait_for(self.flush(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - never mask why the worker stops
            log.warning("rule states not flushed at stop; the next owner catches up", error=type(exc).__name__)

    # --- geofences --------------------------------------------------------------

    async def refresh_geofences(self) -> bool:
        """Reloads the index if any geofence was added, changed or removed; True if so."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_FENCES_VERSION)
            version = (row["n"], row["changed"])
            if version == self._index_version:
                return False
            index = await load_index(conn)
        gone = set(self.index.fences) - set(index.fences)
        self.index, self._index_version = index, version
        for vs in self._states.values():  # grid cells and settled sides belong to the old index
            if vs.position is not None:
                vs.position = vs.position._replace(key=-1, settled=False)
        self._metrics.geofences_active.set(len(index))
        log.info("geofences loaded", active=len(index), cell_deg=index.cell, removed=len(gone))
        if gone and self._redis is not None:
            try:
                await self._redis.delete(*(geofence_key(fid) for fid in gone))
            except Exception as exc:
                if not is_transient(exc):
                    raise
        return True

    # --- the hook -----------------------------------------------------------------

    async def after_write(self, readings: list[Reading]) -> None:
        """Evaluates one batch of stored readings and commits what it changed.

        Transitions and alerts are committed with the states of their vehicles; the other
        states are written every :data:`STATE_FLUSH_SECONDS` or so (a worker that dies before
        catches up from ``vehicle_telemetry``, see :meth:`_load`). When another worker
        changed a state meanwhile, the batch's vehicles are read back and the batch is
        evaluated again. Any other failure (asyncpg errors) is raised after forgetting the
        batch's vehicles, so calling again with the same readings is safe: the
        :class:`~fleet_telemetry.consumers.batch.BatchProcessor` retries transient ones.
        """
        if self._timer is not None and self._timer.done():
            self._timer.result()  # a bug in the timers: raise it in the worker
        if not readings:
            return
        async with self._lock:
            await self._after_write(readings)

    async def _after_write(self, readings: list[Reading]) -> None:
        started = monotonic_clock.perf_counter()
        groups = by_vehicle(readings)
        for attempt in range(10):
            missing = [vid for vid in groups if vid not in self._states]
            batch = groups
            if missing:
                extra = await self._load(missing, groups)
                if extra:
                    batch = {vid: list(rs) for vid, rs in groups.items()}
                    for r in extra:
                        batch[r.vehicle_id].append(r)
            result = evaluate(self._states, batch, self.index, self._th, datetime.now(timezone.utc))
            flush = monotonic_clock.monotonic() - self._flushed >= self._flush_seconds
            if flush:
                write = self._dirty | set(result.states)
            else:  # a vehicle's first state is written at once: catching up starts from it
                write = result.urgent | {vid for vid in result.states if self._persisted.get(vid) is None}
            try:
                await self._write({vid: self._states[vid] for vid in write},
                                  result.fences_changed | self._fences_dirty, result)
            except Exception as exc:
                # The states were advanced in memory: read this batch's vehicles back.
                for vid in groups:
                    self._forget(vid)
                if isinstance(exc, _Conflict):
                    log.info("vehicle states changed by another worker, evaluating again",
                             vehicles=len(exc.vehicles), attempt=attempt)
                    for vid in exc.vehicles:
                        self._forget(vid)
                    continue
                raise  # the caller retries transient failures; the states are read back then
            self._dirty.update(result.states)
            self._fences_dirty.update(result.fences_changed)
            self._written(write)
            if flush:
                self._flushed = monotonic_clock.monotonic()
            break
        else:
            raise RuntimeError("vehicle rule states kept changing under this worker")
        m = self._metrics
        m.late_readings.inc(result.late)
        m.rule_duration.observe(monotonic_clock.perf_counter() - started)
        if result.transitions:
            await self._update_members(result)

    async def flush(self) -> None:
        """Writes every state not written yet; a state another worker changed is dropped."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        for _ in range(10):
            write = set(self._dirty)
            if not write:
                return
            try:
                await self._write({vid: self._states[vid] for vid in write}, self._fences_dirty, None)
            except _Conflict as conflict:
                for vid in conflict.vehicles:
                    self._forget(vid)
                continue
            self._written(write)
            self._flushed = monotonic_clock.monotonic()
            return

    def _written(self, vehicles: set[UUID]) -> None:
        for vid in vehicles:
            self._persisted[vid] = self._states[vid].last_time
        self._dirty -= vehicles
        self._fences_dirty -= vehicles

    def _forget(self, vid: UUID) -> None:
        self._states.pop(vid, None)
        self._persisted.pop(vid, None)
        self._dirty.discard(vid)
        self._fences_dirty.discard(vid)

    async def _load(self, vehicles: list[UUID], groups: dict[UUID, list[Reading]]) -> list[Reading]:
        """Reads the states of ``vehicles`` into the cache; returns the readings to catch up on."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_LOAD_STATES, vehicles)
            fence_rows = await conn.fetch(_LOAD_FENCE_STATES, vehicles)
            fences: dict[UUID, dict[int, FenceState]] = {}
            for f in fence_rows:
                fences.setdefault(f["vehicle_id"], {})[f["geofence_id"]] = FenceState(
                    f["inside"], f["since"], f["pending_since"], f["pending_lat"], f["pending_lon"],
                    f["speeding_since"], f["speeding_max"], f["speeding_open"])
            for vid in vehicles:
                self._states[vid] = VehicleState()
                self._persisted[vid] = None
            for row in rows:
                vid = row["vehicle_id"]
                self._states[vid] = VehicleState.from_row(row, fences.get(vid, {}), self.index)
                self._persisted[vid] = row["last_time"]
            first = {row["vehicle_id"]: min(r.time for r in groups[row["vehicle_id"]]) for row in rows}
            gaps = [(row["vehicle_id"], row["last_time"], first[row["vehicle_id"]]) for row in rows
                    if row["last_time"] < first[row["vehicle_id"]]]
            if not gaps:
                return []
            caught = await conn.fetch(
                _CATCH_UP, [g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps],
                min(g[2] for g in gaps) - CATCH_UP,
            )
        if caught:
            log.info("evaluating readings stored but not evaluated before", readings=len(caught))
        source = Source("vehicle_telemetry", -1, -1)
        return [Reading(r["vehicle_id"], r["time"], r["lat"], r["lon"], r["speed"], r["fuel_level"], r["heading"],
                        r["odometer_km"], r["engine_status"], source, None, b"") for r in caught]

    async def _write(
        self, states: dict[UUID, VehicleState], fence_dirty: set[UUID], result: Evaluation | None
    ) -> None:
        """One transaction: ``states`` (checked against the persisted version, else
        :class:`_Conflict`), their geofence rows where changed, and the batch's
        transitions and alerts."""
        if not states and result is None:
            return
        m = self._metrics
        new = [vid for vid in states if self._persisted.get(vid) is None]
        old = [vid for vid in states if self._persisted.get(vid) is not None]
        counts: list[tuple[str, str]] = []
        transitions_written: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            written: set[UUID] = set()
            if old:
                rows_old = [states[v] for v in old]
                rows = await conn.fetch(
                    _UPDATE_STATES, old, [self._persisted[v] for v in old], [s.last_time for s in rows_old],
                    *_position_columns(rows_old), [s.memory() for s in rows_old],
                )
                written.update(r["vehicle_id"] for r in rows)
            if new:
                rows_new = [states[v] for v in new]
                rows = await conn.fetch(
                    _INSERT_STATES, new, [s.last_time for s in rows_new], *_position_columns(rows_new),
                    [s.memory() for s in rows_new],
                )
                written.update(r["vehicle_id"] for r in rows)
            conflicts = set(states) - written
            if conflicts:
                raise _Conflict(conflicts)

            changed = [vid for vid in states if vid in fence_dirty]
            if changed:
                await conn.execute(_DELETE_FENCE_STATES, changed)
                cols: list[list[Any]] = [[] for _ in range(10)]
                for vid in changed:
                    vs = states[vid]
                    for fid, f in vs.fences.items():
                        if f.is_default():
                            continue
                        for col, value in zip(cols, (vid, fid, f.inside, f.since or vs.last_time,
                                                     f.pending_since, f.pending_lat, f.pending_lon,
                                                     f.speeding_since, f.speeding_max, f.speeding_open)):
                            col.append(value)
                if cols[0]:
                    await conn.execute(_INSERT_FENCE_STATES, *cols)
            if result is None:
                return

            if result.transitions:
                ts = result.transitions
                rows = await conn.fetch(
                    _INSERT_TRANSITIONS, [t.vehicle_id for t in ts], [t.geofence_id for t in ts],
                    [t.kind for t in ts], [t.time for t in ts], [t.lat for t in ts], [t.lon for t in ts],
                    [t.crossing for t in ts],
                )
                transitions_written = [r["kind"] for r in rows]

            plan = plan_alert_rows(result.actions)
            if plan.resolves:
                rows = await conn.fetch(_RESOLVE, *_key_columns(plan.resolves),
                                        [{**a.details, "resolved_reading_time": a.reading_time.isoformat()}
                                         for a in plan.resolves])
                counts.extend((r["type"], "resolved") for r in rows)
            if plan.updates:
                await conn.execute(_UPDATE_DETAILS, *_key_columns(plan.updates), [a.details for a in plan.updates])
            if plan.inserts:
                raises = [opened for opened, _ in plan.inserts]
                details = [opened.details if closing is None else
                           {**opened.details, **closing.details,
                            "resolved_reading_time": closing.reading_time.isoformat()}
                           for opened, closing in plan.inserts]
                rows = await conn.fetch(
                    _RAISE, [a.vehicle_id for a in raises], [a.type for a in raises],
                    [SEVERITY[a.type] for a in raises], [a.geofence_id for a in raises],
                    [a.reading_time for a in raises], details, [c is not None for _, c in plan.inserts],
                )
                for r in rows:
                    counts.append((r["type"], "raised"))
                    if r["is_resolved"]:
                        counts.append((r["type"], "resolved"))
            if result.back_online:
                newest = {vid: result.states[vid].last_time for vid in result.back_online}
                rows = await conn.fetch(_RESOLVE_BACK_ONLINE, list(newest), list(newest.values()))
                counts.extend((r["type"], "resolved") for r in rows)
        for kind, action in counts:
            m.alerts.labels(type=kind, action=action).inc()
        for kind in transitions_written:
            m.geofence_transitions.labels(kind=kind).inc()

    async def _update_members(self, result: Evaluation) -> None:
        """``geofence:{id}``: GEOADD on a confirmed enter, ZREM on a confirmed exit."""
        if self._redis is None:
            return
        final: dict[tuple[int, UUID], Transition] = {}
        for t in result.transitions:
            if not t.crossing:
                final[(t.geofence_id, t.vehicle_id)] = t
        if not final:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (fid, vid), t in final.items():
                    if t.kind == "enter":
                        pipe.geoadd(geofence_key(fid), (t.lon, t.lat, str(vid)))
                    else:
                        pipe.zrem(geofence_key(fid), str(vid))
                await pipe.execute()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("redis unreachable, geofence members not updated", error=type(exc).__name__)

    # --- the timers -------------------------------------------------------------------

    async def _run_timers(self) -> None:
        s = self._settings
        next_check = 0.0
        while True:
            try:
                await self.refresh_geofences()
                if self._dirty and monotonic_clock.monotonic() - self._flushed >= self._flush_seconds:
                    await self.flush()
                if monotonic_clock.monotonic() >= next_check:
                    next_check = monotonic_clock.monotonic() + s.alert_timer_seconds
                    await self.check_offline()
                    await self.check_maintenance()
            except Exception as exc:
                if not is_transient(exc):
                    log.error("rule timers failed", error=type(exc).__name__, detail=str(exc)[:300])
                    raise
                log.warning("rule timers: dependency unavailable, will retry", error=type(exc).__name__)
            await asyncio.sleep(min(s.geofence_refresh_seconds, s.alert_timer_seconds))

    async def check_offline(self) -> None:
        """Raises ``offline`` for vehicles silent for longer than the threshold (wall clock)."""
        seconds = self._th.offline_seconds
        if not seconds:
            return
        async with self._pool.acquire() as conn:
            raised = await conn.fetch(_RAISE_OFFLINE, seconds, SEVERITY[OFFLINE])
            resolved = await conn.fetch(_RESOLVE_OFFLINE_RACE, seconds)
        self._metrics.alerts.labels(type=OFFLINE, action="raised").inc(len(raised))
        self._metrics.alerts.labels(type=OFFLINE, action="resolved").inc(len(resolved))

    async def check_maintenance(self) -> None:
        """Raises ``maintenance_due`` by date or odometer; resolves it once nothing is due."""
        async with self._pool.acquire() as conn:
            raised = await conn.fetch(_RAISE_DUE, SEVERITY[MAINTENANCE_DUE])
            resolved = await conn.fetch(_RESOLVE_DUE)
        self._metrics.alerts.labels(type=MAINTENANCE_DUE, action="raised").inc(len(raised))
        self._metrics.alerts.labels(type=MAINTENANCE_DUE, action="resolved").inc(len(resolved))


def _position_columns(states: list[VehicleState]) -> tuple[list[float | None], list[float | None], list[float | None]]:
    return ([s.position.lat if s.position else None for s in states],
            [s.position.lon if s.position else None for s in states],
            [s.odometer_km for s in states])


def _key_columns(actions: list[AlertAction]) -> tuple[list[UUID], list[str], list[int]]:
    return ([a.vehicle_id for a in actions], [a.type for a in actions], [a.geofence_id or 0 for a in actions])
