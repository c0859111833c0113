"""A vehicle's trips and stops over a period (``fleet trips list``, ``fleet stops list``),
their recomputation (``fleet trips rebuild``), and a vehicle with its odometer and engine
hours (``fleet vehicles show``).

A trip or stop belongs to the period when it overlaps it (an open one runs until now).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.vehicles import get_vehicle
from fleet_telemetry.trips.model import thresholds_from_settings
from fleet_telemetry.trips.recompute import rebuild, vehicles_to_rebuild

# Served by trips_vehicle_start_idx / stops_vehicle_start_idx.
_TRIPS = """
SELECT id::text, vehicle_id::text, driver_id::text, start_time, end_time,
       ST_Y(start_location) AS start_lat, ST_X(start_location) AS start_lon, start_geofence_id,
       ST_Y(end_location) AS end_lat, ST_X(end_location) AS end_lon, end_geofence_id,
       round(distance_km::numeric, 3)::float8 AS distance_km, duration_s, max_speed_kmh,
       round(avg_speed_kmh::numeric, 1)::float8 AS avg_speed_kmh, fuel_used_percent, idle_s,
       round(start_odometer_km::numeric, 3)::float8 AS start_odometer_km,
       round(end_odometer_km::numeric, 3)::float8 AS end_odometer_km
FROM trips
WHERE vehicle_id = $1 AND start_time < coalesce($3::timestamptz, 'infinity') AND coalesce(end_time, 'infinity') > $2::timestamptz
ORDER BY start_time
LIMIT $4
"""
_STOPS = """
SELECT id::text, vehicle_id::text, start_time, end_time, ST_Y(location) AS lat, ST_X(location) AS lon,
       geofence_id, duration_s, idle_s
FROM stops
WHERE vehicle_id = $1 AND start_time < coalesce($3::timestamptz, 'infinity') AND coalesce(end_time, 'infinity') > $2::timestamptz
ORDER BY start_time
LIMIT $4
"""


async def list_trips(conn: asyncpg.Connection, *, vehicle_id: UUID, start: datetime, end: datetime | None,
                     limit: int = 100) -> list[dict[str, Any]]:
    """The vehicle's trips overlapping [start, end), oldest first."""
    return [dict(r) for r in await conn.fetch(_TRIPS, vehicle_id, start, end, limit)]


async def list_stops(conn: asyncpg.Connection, *, vehicle_id: UUID, start: datetime, end: datetime | None,
                     limit: int = 100) -> list[dict[str, Any]]:
    """The vehicle's stops overlapping [start, end), oldest first."""
    return [dict(r) for r in await conn.fetch(_STOPS, vehicle_id, start, end, limit)]


async def rebuild_trips(db: Database, *, settings: Settings, since: datetime,
                        vehicle_id: UUID | None) -> dict[str, Any]:
    """Recomputes the trips, stops and accumulators of every vehicle (or one) from its
    last trip that started at or before ``since``; one progress line per vehicle on stderr.
    Idempotent: a second run rewrites nothing."""
    th = thresholds_from_settings(settings)
    totals = {"vehicles": 0, "readings": 0, "trips": 0, "stops": 0, "deleted": 0, "new_events": 0}
    async with db.write() as conn:
        vehicles = await vehicles_to_rebuild(conn, since, vehicle_id)
        for i, vid in enumerate(vehicles, 1):
            done = await rebuild(conn, vid, since, th, datetime.now(timezone.utc))
            print(f"[{i}/{len(vehicles)}] vehicle {vid}: {done.readings} readings, {done.trips} trips,"
                  f" {done.stops} stops, {done.deleted} removed, {done.events} new events", file=sys.stderr)
            totals["vehicles"] += 1
            totals["readings"] += done.readings
            totals["trips"] += done.trips
            totals["stops"] += done.stops
            totals["deleted"] += done.deleted
            totals["new_events"] += done.events
    return totals


_ACCUMULATORS = """
SELECT round(odometer_km::numeric, 3)::float8 AS odometer_km, round((engine_s / 3600)::numeric, 2)::float8 AS engine_hours,
       last_time AS accumulated_until
FROM vehicle_motion_state WHERE vehicle_id = $1
"""


async def show_vehicle(conn: asyncpg.Connection, vehicle_id: UUID) -> dict[str, Any]:
    """``fleet vehicles show``: the live vehicle with its accumulators (the odometer, the
    device's when it sends one, else summed from the positions; engine hours with the
    ignition on), None before its first processed reading. Raises NotFound."""
    vehicle = await get_vehicle(conn, vehicle_id)
    row = await conn.fetchrow(_ACCUMULATORS, vehicle_id)
    return {**vehicle, "odometer_km": None if row is None else row["odometer_km"],
            "engine_hours": None if row is None else row["engine_hours"],
            "accumulated_until": None if row is None else row["accumulated_until"]}
