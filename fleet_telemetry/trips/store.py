"""The trips machine's rows in PostgreSQL: the vehicles' motion states
(``vehicle_motion_state``), the ``trips`` and ``stops`` rows, the ``idling`` alerts, the
vehicle-hours late readings touched, and the outbox events of trips and stops.

Everything one run of the machine decided is written in one transaction with the states
of its vehicles (:func:`write_changes`); a state row is updated only if its
``last_time`` and ``revision`` still hold what the writer read, else
:class:`StateConflict` rolls the whole transaction back.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.core.events import (
    STOP_ENDED,
    STOP_STARTED,
    TRIP_ENDED,
    TRIP_STARTED,
    FleetEvent,
    record_events,
)
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.trips.model import (
    IDLING_SEVERITY,
    Changes,
    IdleAction,
    MotionState,
    StopDraft,
    StopRow,
    TripDraft,
    TripRow,
)

LOAD_STATES = """
SELECT vehicle_id, last_time, revision, odometer_km, engine_s, memory
FROM vehicle_motion_state WHERE vehicle_id = ANY($1::uuid[])
"""
# Readings stored but not processed: after the state's last_time, before the batch's first.
CATCH_UP = """
SELECT u.v AS vehicle_id, t.time, ST_Y(t.location) AS lat, ST_X(t.location) AS lon, t.speed, t.fuel_level,
       t.heading, t.odometer_km, t.engine_status
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(v, after, before)
CROSS JOIN LATERAL (
    SELECT * FROM vehicle_telemetry WHERE vehicle_id = u.v AND time > u.after AND time < u.before
) AS t
ORDER BY u.v, t.time
"""
_UPDATE_STATES = """
UPDATE vehicle_motion_state AS s
SET last_time = u.t, odometer_km = u.odo, engine_s = u.eng, memory = u.memory, updated_at = now()
FROM unnest($1::uuid[], $2::timestamptz[], $3::int8[], $4::timestamptz[], $5::float8[], $6::float8[], $7::jsonb[])
     AS u(v, expected, rev, t, odo, eng, memory)
WHERE s.vehicle_id = u.v AND s.last_time = u.expected AND s.revision = u.rev
RETURNING s.vehicle_id
"""
_INSERT_STATES = """
INSERT INTO vehicle_motion_state (vehicle_id, last_time, odometer_km, engine_s, memory)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::jsonb[])
ON CONFLICT (vehicle_id) DO NOTHING
RETURNING vehicle_id
"""
_POINT = "ST_SetSRID(ST_MakePoint({lon}, {lat}), 4326)"
# New trips get their driver and start geofence; a trip seen again gets its end and
# figures. A row that came out the same is left alone, so a recomputation touches only what
# changed; where only the odometer and engine hours at its start and end moved (a backfill
# added distance before it), updated_at stays.
_FIGURES = ("end_time", "end_location", "distance_km", "duration_s", "max_speed_kmh", "fuel_used_percent", "idle_s")
_ACCUMULATORS = ("end_odometer_km", "start_odometer_km", "start_engine_s")


def _row(prefix: str, names: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"{prefix}.{n}" for n in names) + ")"


_UPSERT_TRIPS = f"""
INSERT INTO trips AS x (id, vehicle_id, driver_id, start_time, start_location, start_geofence_id, end_time,
                        end_location, end_geofence_id, distance_km, duration_s, max_speed_kmh, avg_speed_kmh,
                        fuel_used_percent, idle_s, start_odometer_km, end_odometer_km, start_engine_s)
SELECT u.id, u.v, fleet_driver_at(u.v, u.st), u.st, {_POINT.format(lon="u.slon", lat="u.slat")},
       fleet_geofence_at(u.slon, u.slat), u.et,
       CASE WHEN u.et IS NOT NULL THEN {_POINT.format(lon="u.elon", lat="u.elat")} END,
       CASE WHEN u.et IS NOT NULL THEN fleet_geofence_at(u.elon, u.elat) END,
       u.dist, u.dur, u.vmax, u.vavg, u.fuel, u.idle, u.odo0, u.odo1, u.eng0
FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::float8[], $5::float8[], $6::timestamptz[],
            $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::float8[], $13::float8[],
            $14::float8[], $15::float8[], $16::float8[], $17::float8[])
     AS u(id, v, st, slat, slon, et, elat, elon, dist, dur, vmax, vavg, fuel, idle, odo0, odo1, eng0)
ON CONFLICT (id) DO UPDATE
SET end_time = excluded.end_time, end_location = excluded.end_location, end_geofence_id = excluded.end_geofence_id,
    distance_km = excluded.distance_km, duration_s = excluded.duration_s, max_speed_kmh = excluded.max_speed_kmh,
    avg_speed_kmh = excluded.avg_speed_kmh, fuel_used_percent = excluded.fuel_used_percent,
    idle_s = excluded.idle_s, end_odometer_km = excluded.end_odometer_km,
    start_odometer_km = excluded.start_odometer_km, start_engine_s = excluded.start_engine_s,
    updated_at = CASE WHEN {_row("x", _FIGURES)} IS DISTINCT FROM {_row("excluded", _FIGURES)} THEN now()
                      ELSE x.updated_at END
WHERE {_row("x", _FIGURES + _ACCUMULATORS)} IS DISTINCT FROM {_row("excluded", _FIGURES + _ACCUMULATORS)}
RETURNING x.id, x.driver_id, x.start_geofence_id, x.end_geofence_id
"""
_UPSERT_STOPS = f"""
INSERT INTO stops AS x (id, vehicle_id, start_time, end_time, location, geofence_id, duration_s, idle_s)
SELECT u.id, u.v, u.st, u.et, {_POINT.format(lon="u.lon", lat="u.lat")}, fleet_geofence_at(u.lon, u.lat),
       u.dur, u.idle
FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], $5::float8[], $6::float8[],
            $7::float8[], $8::float8[]) AS u(id, v, st, et, lat, lon, dur, idle)
ON CONFLICT (id) DO UPDATE
SET end_time = excluded.end_time, duration_s = excluded.duration_s, idle_s = excluded.idle_s, updated_at = now()
WHERE (x.end_time, x.duration_s, x.idle_s) IS DISTINCT FROM (excluded.end_time, excluded.duration_s, excluded.idle_s)
RETURNING x.id, x.geofence_id
"""
_RAISE_IDLING = """
INSERT INTO alerts (entity_id, type, severity, reading_time, details)
VALUES ($1, 'idling', $2, $3, $4)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved AND type <> 'document_expiring' DO NOTHING
RETURNING id
"""
_RESOLVE_IDLING = """
UPDATE alerts SET is_resolved = true, resolved_at = now(), details = details || $2::jsonb
WHERE entity_id = $1 AND type = 'idling' AND geofence_id IS NULL AND NOT is_resolved
RETURNING id
"""
_MARK_LATE = """
INSERT INTO trip_dirty_hours (vehicle_id, hour)
SELECT DISTINCT v, date_trunc('hour', t, 'UTC') FROM unnest($1::uuid[], $2::timestamptz[]) AS u(v, t)
ON CONFLICT DO NOTHING
"""


async def mark_for_recompute(conn: asyncpg.Connection, readings: Sequence[Reading]) -> None:
    """Marks the vehicle-hours of ``readings`` for ``fleet maintain`` to recompute their
    trips, stops and accumulators: what a backfill written around the workers (``fleet
    replay --direct``) needs, as the trips stage never sees those readings. A vehicle the
    workers never processed has nothing to recompute; marking it costs one row."""
    if readings:
        await conn.execute(_MARK_LATE, [r.vehicle_id for r in readings], [r.time for r in readings])


class StateConflict(Exception):
    """Another writer changed these vehicles' motion state rows since they were read."""

    def __init__(self, vehicles: set[UUID]) -> None:
        super().__init__(f"{len(vehicles)} vehicle motion states changed under us")
        self.vehicles = vehicles


async def use_json(conn: asyncpg.Connection) -> None:
    """jsonb as Python values on ``conn`` (the workers' pool does it in its own way)."""
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(),
                              decoder=orjson.loads, format="text")


# --- the state row ------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def memory_of(st: MotionState) -> dict[str, Any]:
    """The ``memory`` column: everything but the columns of their own."""
    trip, stop = st.trip, st.stop
    return {
        "lat": st.lat, "lon": st.lon, "ignition": st.ignition,
        "halt": None if st.halt_since is None else [st.halt_since.isoformat(), st.halt_lat, st.halt_lon],
        "idle_since": _iso(st.idle_since), "idle_alert": st.idle_alert,
        "trip": None if trip is None else {
            "start": trip.start.isoformat(), "lat": trip.lat, "lon": trip.lon, "odo": trip.odometer_km,
            "eng": trip.engine_s, "confirmed": trip.confirmed, "dist": trip.distance_km,
            "halt_dist": trip.halt_distance_km, "moved": _iso(trip.moved_until), "vmax": trip.max_speed,
            "fuel0": trip.fuel_start, "fuel1": trip.fuel_last, "idle": trip.idle_s},
        "stop": None if stop is None else {"start": stop.start.isoformat(), "lat": stop.lat, "lon": stop.lon,
                                           "idle": stop.idle_s},
    }


def state_from_row(row: Any) -> MotionState:
    """A ``vehicle_motion_state`` row as a :class:`MotionState`."""
    m = row["memory"] or {}
    st = MotionState(last_time=row["last_time"], lat=m.get("lat", 0.0), lon=m.get("lon", 0.0),
                     odometer_km=row["odometer_km"], engine_s=row["engine_s"], ignition=m.get("ignition"),
                     idle_since=_time(m.get("idle_since")), idle_alert=bool(m.get("idle_alert")))
    halt = m.get("halt")
    if halt is not None:
        st.halt_since, st.halt_lat, st.halt_lon = datetime.fromisoformat(halt[0]), halt[1], halt[2]
    t = m.get("trip")
    if t is not None:
        st.trip = TripDraft(datetime.fromisoformat(t["start"]), t["lat"], t["lon"], t["odo"], t["eng"],
                            t["confirmed"], t["dist"], t["halt_dist"], _time(t["moved"]), t["vmax"], t["fuel0"],
                            t["fuel1"], t["idle"])
    s = m.get("stop")
    if s is not None:
        st.stop = StopDraft(datetime.fromisoformat(s["start"]), s["lat"], s["lon"], s["idle"])
    return st


def readings_of(rows: Sequence[Any]) -> list[Reading]:
    """``vehicle_telemetry`` rows (as :data:`CATCH_UP` selects them) as readings."""
    source = Source("vehicle_telemetry", -1, -1)
    return [Reading(r["vehicle_id"], r["time"], r["lat"], r["lon"], r["speed"], r["fuel_level"], r["heading"],
                    r["odometer_km"], r["engine_status"], source, None, b"") for r in rows]


async def write_states(conn: asyncpg.Connection, states: dict[UUID, MotionState],
                       versions: dict[UUID, tuple[datetime, int] | None]) -> None:
    """Updates the rows still at the (last_time, revision) in ``versions``, inserts those
    without a row (None); raises :class:`StateConflict` for the others."""
    old = [v for v in states if versions.get(v) is not None]
    new = [v for v in states if versions.get(v) is None and states[v].last_time is not None]
    written: set[UUID] = set()
    if old:
        rows = [states[v] for v in old]
        seen = [versions[v] or (datetime.min, 0) for v in old]
        written.update(r["vehicle_id"] for r in await conn.fetch(
            _UPDATE_STATES, old, [s[0] for s in seen], [s[1] for s in seen], [s.last_time for s in rows],
            [s.odometer_km for s in rows], [s.engine_s for s in rows], [memory_of(s) for s in rows]))
    if new:
        rows = [states[v] for v in new]
        written.update(r["vehicle_id"] for r in await conn.fetch(
            _INSERT_STATES, new, [s.last_time for s in rows], [s.odometer_km for s in rows],
            [s.engine_s for s in rows], [memory_of(s) for s in rows]))
    conflicts = set(old) - written | (set(new) - written)
    if conflicts:
        raise StateConflict(conflicts)


# --- what the machine decided ----------------------------------------------------------------


async def write_changes(conn: asyncpg.Connection, out: Changes, *, mark_late: bool = True
                        ) -> tuple[list[FleetEvent], tuple[int, int]]:
    """Writes the trips, stops, ``idling`` alerts and late marks of ``out`` inside the
    caller's transaction, with the outbox events of the trips and stops written or changed;
    returns the events that were new and the ``idling`` alerts (raised, resolved).
    Raises asyncpg errors."""
    events: list[FleetEvent] = []
    idling = (0, 0)
    if out.trips:
        events += await _write_trips(conn, out.trips)
    if out.stops:
        events += await _write_stops(conn, out.stops)
    if out.idle:
        idling = await _write_idling(conn, out.idle)
    if out.late and mark_late:
        await conn.execute(_MARK_LATE, [v for v, _ in out.late], [t for _, t in out.late])
    return (await record_events(conn, events) if events else []), idling


def _last_of_each(rows: Sequence[Any]) -> list[Any]:
    """One row per id, the last decided, in the order the ids first came."""
    latest: dict[UUID, Any] = {}
    for row in rows:
        latest[row.id] = row
    return list(latest.values())


async def _write_trips(conn: asyncpg.Connection, trips: list[TripRow]) -> list[FleetEvent]:
    rows = _last_of_each(trips)
    cols: list[list[Any]] = [[] for _ in range(17)]
    for r in rows:
        for col, value in zip(cols, (r.id, r.vehicle_id, r.start, r.start_lat, r.start_lon, r.end, r.end_lat,
                                     r.end_lon, r.distance_km, r.duration_s, r.max_speed_kmh, r.avg_speed_kmh,
                                     r.fuel_used_percent, r.idle_s, r.start_odometer_km, r.end_odometer_km,
                                     r.start_engine_s)):
            col.append(value)
    written = {r["id"]: r for r in await conn.fetch(_UPSERT_TRIPS, *cols)}
    events = []
    for r in trips:
        w = written.get(r.id)
        if w is None:
            continue  # unchanged: its events were recorded with it
        start = {"trip_id": str(r.id), "start_time": r.start.isoformat(), "start": [r.start_lat, r.start_lon],
                 "start_geofence_id": w["start_geofence_id"], "start_odometer_km": r.start_odometer_km}
        if r.end is None:
            events.append(FleetEvent.of(TRIP_STARTED, r.vehicle_id, r.start, start, r.start,
                                        driver_id=w["driver_id"]))
        else:
            events.append(FleetEvent.of(TRIP_ENDED, r.vehicle_id, r.end, {
                **start, "end_time": r.end.isoformat(), "end": [r.end_lat, r.end_lon],
                "end_geofence_id": w["end_geofence_id"], "distance_km": _round(r.distance_km),
                "duration_s": r.duration_s, "max_speed_kmh": r.max_speed_kmh,
                "avg_speed_kmh": _round(r.avg_speed_kmh), "fuel_used_percent": r.fuel_used_percent,
                "idle_s": r.idle_s, "end_odometer_km": _round(r.end_odometer_km),
            }, r.start, driver_id=w["driver_id"]))
    return events


async def _write_stops(conn: asyncpg.Connection, stops: list[StopRow]) -> list[FleetEvent]:
    rows = _last_of_each(stops)
    written = {r["id"]: r for r in await conn.fetch(
        _UPSERT_STOPS, [r.id for r in rows], [r.vehicle_id for r in rows], [r.start for r in rows],
        [r.end for r in rows], [r.lat for r in rows], [r.lon for r in rows], [r.duration_s for r in rows],
        [r.idle_s for r in rows])}
    events = []
    for r in stops:
        w = written.get(r.id)
        if w is None:
            continue
        data = {"stop_id": str(r.id), "start_time": r.start.isoformat(), "position": [r.lat, r.lon],
                "geofence_id": w["geofence_id"]}
        if r.end is None:
            events.append(FleetEvent.of(STOP_STARTED, r.vehicle_id, r.start, data, r.start))
        else:
            events.append(FleetEvent.of(STOP_ENDED, r.vehicle_id, r.end, {
                **data, "end_time": r.end.isoformat(), "duration_s": r.duration_s, "idle_s": r.idle_s}, r.start))
    return events


async def _write_idling(conn: asyncpg.Connection, actions: list[IdleAction]) -> tuple[int, int]:
    """In order: rare, so one statement each. Returns the alerts (raised, resolved)."""
    raised = resolved = 0
    for a in actions:
        if a.action == "raise":
            raised += len(await conn.fetch(_RAISE_IDLING, a.vehicle_id, IDLING_SEVERITY, a.reading_time, a.details))
        else:
            resolved += len(await conn.fetch(_RESOLVE_IDLING, a.vehicle_id,
                                             {**a.details, "resolved_reading_time": a.reading_time.isoformat()}))
    return raised, resolved


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

