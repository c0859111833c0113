"""The seed's critical queries (section 7.1), each one plain SQL in one function.

All of them only read: run them on :meth:`fleet_telemetry.fleetops.db.Database.read`'s
connection, which a replica serves when one is configured and up.

- :func:`available_vehicles`, :func:`available_drivers`: who has no ACTIVE booking
  overlapping ``[start, end)``; range types and the exclusion constraints' GiST indexes.
- :func:`nearest_available_drivers`: drivers on duty (an ACTIVE assignment covering now)
  whose vehicle reported a position recently, with no open job on that assignment,
  within a radius of a pickup point, nearest first. Positions come from
  ``vehicle_positions`` (kept by the telemetry consumer); the radius is searched through
  its geography GiST index, never by scanning every position.
- :func:`monthly_profitability`: per vehicle and month, revenue of delivered jobs
  (``monthly_vehicle_revenue``) minus maintenance cost (``monthly_vehicle_stats``).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.values import Point, check_period

# Live, active vehicles without an ACTIVE booking overlapping [$1, $2), in plate order.
# The plate index (live rows) gives the order, the exclusion constraint's GiST index
# (vehicle_id =, period &&) answers each "booked?" probe; LIMIT stops the walk early.
AVAILABLE_VEHICLES = """
SELECT v.id, v.vin, v.license_plate, v.make, v.model, v.type
  FROM vehicles v
 WHERE v.deleted_at IS NULL AND v.status = 'active'
   AND ($3::text IS NULL OR v.type = $3)
   AND NOT EXISTS (
        SELECT 1 FROM vehicle_assignments a
         WHERE a.vehicle_id = v.id AND a.status = 'ACTIVE'
           AND tstzrange(a.start_time, a.end_time, '[)') && tstzrange($1, $2, '[)'))
 ORDER BY v.license_plate
 LIMIT $4
"""

# Live, active drivers without an ACTIVE booking overlapping [$1, $2), by name.
AVAILABLE_DRIVERS = """
SELECT d.id, d.name, d.license_number
  FROM drivers d
 WHERE d.deleted_at IS NULL AND d.status = 'active'
   AND NOT EXISTS (
        SELECT 1 FROM vehicle_assignments a
         WHERE a.driver_id = d.id AND a.status = 'ACTIVE'
           AND tstzrange(a.start_time, a.end_time, '[)') && tstzrange($1, $2, '[)'))
 ORDER BY d.name, d.id
 LIMIT $3
"""

# $1 lon, $2 lat, $3 radius in metres, $4 oldest position accepted (seconds), $5 limit.
# ST_DWithin on geography uses vehicle_positions_location_geog_gist; each candidate is
# joined to its ACTIVE assignment covering now through the exclusion constraint's index.
NEAREST_AVAILABLE_DRIVERS = """
WITH pickup AS (SELECT ST_SetSRID(ST_MakePoint($1, $2), 4326)::geography AS g)
SELECT d.id AS driver_id, d.name, a.id AS assignment_id, p.vehicle_id, v.license_plate,
       ST_Y(p.location) AS lat, ST_X(p.location) AS lon, p.time AS position_time,
       ST_Distance(p.location::geography, pickup.g) AS distance_m
  FROM pickup
  JOIN vehicle_positions p ON ST_DWithin(p.location::geography, pickup.g, $3)
  JOIN vehicles v ON v.id = p.vehicle_id AND v.deleted_at IS NULL
  JOIN vehicle_assignments a
    ON a.vehicle_id = p.vehicle_id AND a.status = 'ACTIVE'
   AND tstzrange(a.start_time, a.end_time, '[)') @> now()
  JOIN drivers d ON d.id = a.driver_id AND d.deleted_at IS NULL AND d.status = 'active'
 WHERE p.time >= now() - make_interval(secs => $4)
   AND NOT EXISTS (
        SELECT 1 FROM transport_jobs j
         WHERE j.assignment_id = a.id AND j.status IN ('assigned', 'in_transit')
           AND j.deleted_at IS NULL)
 ORDER BY distance_m, d.id
 LIMIT $5
"""

PROFITABILITY = """
WITH cost AS (
    SELECT vehicle_id, month, total_cost, records
      FROM monthly_vehicle_stats WHERE month BETWEEN $1 AND $2
), revenue AS (
    SELECT vehicle_id, month,
           sum(revenue) FILTER (WHERE currency = $3) AS revenue,
           (sum(jobs) FILTER (WHERE currency = $3))::bigint  AS jobs,
           (sum(jobs) FILTER (WHERE currency <> $3))::bigint AS jobs_other_currency
      FROM monthly_vehicle_revenue WHERE month BETWEEN $1 AND $2
     GROUP BY 1, 2
)
SELECT vehicle_id, month, v.license_plate,
       coalesce(r.revenue, 0.00)                                AS revenue,
       coalesce(c.total_cost, 0.00)                             AS maintenance_cost,
       coalesce(r.revenue, 0.00) - coalesce(c.total_cost, 0.00) AS profit,
       coalesce(r.jobs, 0)                                AS jobs,
       coalesce(r.jobs_other_currency, 0)                 AS jobs_other_currency,
       coalesce(c.records, 0)                             AS services
  FROM cost c
  FULL JOIN revenue r USING (vehicle_id, month)
  LEFT JOIN vehicles v ON v.id = vehicle_id
 WHERE $4::uuid IS NULL OR vehicle_id = $4
 ORDER BY month, profit DESC, vehicle_id
"""


async def available_vehicles(conn: asyncpg.Connection, start: datetime, end: datetime | None, *,
                             vehicle_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Active, live vehicles free over ``[start, end)`` (``end`` None: from ``start`` on),
    in plate order. Back-to-back bookings do not overlap. Raises InvalidInput."""
    check_period(start, end, start_field="from", end_field="to")
    rows = await conn.fetch(AVAILABLE_VEHICLES, start, end, vehicle_type, limit)
    return [snapshot(r) or {} for r in rows]


async def available_drivers(conn: asyncpg.Connection, start: datetime, end: datetime | None, *,
                            limit: int = 100) -> list[dict[str, Any]]:
    """Active, live drivers free over ``[start, end)``, by name. Raises InvalidInput."""
    check_period(start, end, start_field="from", end_field="to")
    rows = await conn.fetch(AVAILABLE_DRIVERS, start, end, limit)
    return [snapshot(r) or {} for r in rows]


async def nearest_available_drivers(conn: asyncpg.Connection, pickup: Point, radius_m: float, *,
                                    limit: int = 5, max_age_seconds: float = 900.0) -> list[dict[str, Any]]:
    """Drivers on duty and free, whose vehicle is within ``radius_m`` metres of ``pickup``
    by its last position no older than ``max_age_seconds``; nearest first, with the
    distance in metres (on the WGS 84 spheroid)."""
    rows = await conn.fetch(NEAREST_AVAILABLE_DRIVERS, pickup.lon, pickup.lat, radius_m,
                            max_age_seconds, limit)
    return [snapshot(r) or {} for r in rows]


async def monthly_profitability(conn: asyncpg.Connection, first_month: date, last_month: date, *,
                                currency: str = "EUR", vehicle_id: UUID | None = None) -> list[dict[str, Any]]:
    """Per vehicle and month in ``[first_month, last_month]``: revenue of delivered jobs in
    ``currency`` (jobs priced in another currency are counted in ``jobs_other_currency``,
    not added), maintenance cost, profit. Reads the materialized views, as fresh as their
    last refresh (:func:`refresh_reports`)."""
    rows = await conn.fetch(PROFITABILITY, first_month.replace(day=1), last_month.replace(day=1),
                            currency, vehicle_id)
    return [snapshot(r) or {} for r in rows]


async def refresh_reports(conn: asyncpg.Connection) -> None:
    """Recomputes ``monthly_vehicle_stats`` and ``monthly_vehicle_revenue`` without blocking
    their readers (CONCURRENTLY). Writes: run it on the primary."""
    for view in ("monthly_vehicle_stats", "monthly_vehicle_revenue"):
        await conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")
