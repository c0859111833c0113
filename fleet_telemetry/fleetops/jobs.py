"""Transport jobs with their route and shipments (seed 2.3), each change audited.

A job belongs to a customer, has an agreed price, an optional pickup/delivery window,
one planned route (origin, destination, the path through the stops) and its cargo.
Dispatching ties it to an ACTIVE assignment (a vehicle with its driver), which is what
lets revenue be counted per vehicle (``monthly_vehicle_revenue``). Status life cycle:
``pending -> assigned -> in_transit -> delivered``, or ``cancelled`` before delivery;
``delivered`` records ``delivered_at``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.entities import insert_row, update_row
from fleet_telemetry.fleetops.errors import Conflict, InvalidInput, NotFound
from fleet_telemetry.fleetops.validation import (
    JOB_STATUSES,
    Route,
    Shipment,
    check_job_transition,
    job_fields,
    shipment,
)
from fleet_telemetry.fleetops.values import check_period, parse_choice

_JOB_COLUMNS = ("customer_id", "agreed_price", "currency", "pickup_at", "deliver_by")

# The path is stored as a LineString through origin, stops and destination; its length on
# the spheroid is the distance unless one is given.
_INSERT_ROUTE = """
WITH path AS (
    SELECT ST_SetSRID(ST_MakeLine(ARRAY(
               SELECT ST_MakePoint(lon, lat) FROM unnest($2::float8[], $3::float8[])
                      WITH ORDINALITY AS u(lon, lat, n) ORDER BY n)), 4326) AS line
)
INSERT INTO routes (job_id, origin, destination, waypoints, distance_km)
SELECT $1, ST_StartPoint(line), ST_EndPoint(line), line,
       coalesce($4::float8, ST_Length(line::geography) / 1000.0)
  FROM path
"""

_ROUTE_VIEW = """
SELECT id, ST_Y(origin) AS origin_lat, ST_X(origin) AS origin_lon,
       ST_Y(destination) AS destination_lat, ST_X(destination) AS destination_lon,
       ARRAY(SELECT ARRAY[ST_Y(d.geom), ST_X(d.geom)] FROM ST_DumpPoints(waypoints) AS d
              ORDER BY d.path) AS path,
       distance_km
  FROM routes WHERE job_id = $1 ORDER BY created_at
"""

# clock_timestamp(), not now(): the cargo of one job keeps the order it was given in.
_INSERT_SHIPMENT = (
    "INSERT INTO shipments (job_id, type, weight_kg, dimensions, description, created_at)"
    " VALUES ($1, $2, $3, $4, $5, clock_timestamp()) RETURNING *"
)


async def job_view(conn: asyncpg.Connection, job_id: UUID, *, lock: bool = False,
                   include_deleted: bool = False) -> dict[str, Any]:
    """The job with ``route`` and ``shipments``, as JSON-ready data; raises NotFound."""
    row = await conn.fetchrow(
        "SELECT * FROM transport_jobs WHERE id = $1" + ("" if include_deleted else " AND deleted_at IS NULL")
        + (" FOR UPDATE" if lock else ""), job_id,
    )
    if row is None:
        raise NotFound(f"no job with id {job_id} (unknown, or deleted)")
    view = snapshot(row) or {}
    route = await conn.fetchrow(_ROUTE_VIEW, job_id)
    view["route"] = None if route is None else {
        "origin": {"lat": route["origin_lat"], "lon": route["origin_lon"]},
        "destination": {"lat": route["destination_lat"], "lon": route["destination_lon"]},
        "path": [{"lat": p[0], "lon": p[1]} for p in route["path"]],
        "distance_km": route["distance_km"],
    }
    view["shipments"] = [snapshot(s) for s in await conn.fetch(
        "SELECT * FROM shipments WHERE job_id = $1 ORDER BY created_at, id", job_id)]
    return view


@requires("jobs:write")
async def create_job(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                     job_id: UUID | None = None) -> dict[str, Any]:
    """Creates a pending job with its route and shipments; commits them with one audit row
    holding the whole job. Returns :func:`job_view`.

    Raises InvalidInput (coordinates out of range, deliver_by not after pickup_at, ...),
    NotFound (unknown or deleted customer), Conflict (the id exists).
    """
    values = job_fields(data)
    async with conn.transaction():
        customer = await conn.fetchval(
            "SELECT id FROM customers WHERE id = $1 AND deleted_at IS NULL FOR SHARE", values["customer_id"]
        )
        if customer is None:
            raise NotFound(f"no customer with id {values['customer_id']} (unknown, or deleted)")
        columns = {c: values[c] for c in _JOB_COLUMNS if c in values}
        try:
            async with conn.transaction():
                new_id = (await insert_row(conn, "transport_jobs", columns, row_id=job_id))["id"]
        except asyncpg.exceptions.UniqueViolationError:
            raise Conflict(f"a job with id {job_id} exists already") from None
        route: Route | None = values.get("route")
        if route is not None:
            path = route.path()
            await conn.execute(_INSERT_ROUTE, new_id, [p.lon for p in path], [p.lat for p in path],
                               route.distance_km)
        for item in values.get("shipments", ()):
            await _insert_shipment(conn, new_id, item)
        view = await job_view(conn, new_id)
        await audit.record(conn, actor=actor, action="job.create", entity_type="job", entity_id=new_id,
                           before=None, after=view)
    return view


async def _insert_shipment(conn: asyncpg.Connection, job_id: UUID, item: Shipment) -> asyncpg.Record:
    return await conn.fetchrow(_INSERT_SHIPMENT, job_id, item.type, item.weight_kg, item.dimensions,
                               item.description)


@requires("jobs:write")
async def add_shipment(conn: asyncpg.Connection, *, actor: str, job_id: UUID,
                       data: Mapping[str, Any]) -> dict[str, Any]:
    """Adds cargo to a job that is not delivered or cancelled; commits with an audit row."""
    item = shipment(data)
    async with conn.transaction():
        before = await _open_job(conn, job_id)
        await _insert_shipment(conn, job_id, item)
        after = await job_view(conn, job_id)
        await audit.record(conn, actor=actor, action="job.add_shipment", entity_type="job",
                           entity_id=job_id, before=before, after=after)
    return after


@requires("jobs:write")
async def update_job(conn: asyncpg.Connection, *, actor: str, job_id: UUID,
                     changes: Mapping[str, Any]) -> dict[str, Any]:
    """Changes the price, currency or window of a job not yet delivered or cancelled.

    Raises InvalidInput (window reversed, also against the stored half), NotFound, Conflict.
    """
    values = job_fields(changes, partial=True)
    async with conn.transaction():
        before = await _open_job(conn, job_id)
        pickup = values.get("pickup_at", before["pickup_at"] and datetime.fromisoformat(before["pickup_at"]))
        deliver = values.get("deliver_by",
                             before["deliver_by"] and datetime.fromisoformat(before["deliver_by"]))
        if pickup is not None and deliver is not None:
            check_period(pickup, deliver, start_field="pickup_at", end_field="deliver_by")
        await update_row(conn, "transport_jobs", job_id, values)
        after = await job_view(conn, job_id)
        await audit.record(conn, actor=actor, action="job.update", entity_type="job", entity_id=job_id,
                           before=before, after=after)
    return after


@requires("jobs:write")
async def assign_job(conn: asyncpg.Connection, *, actor: str, job_id: UUID,
                     assignment_id: UUID) -> dict[str, Any]:
    """Dispatches a pending (or re-dispatches an assigned) job to an ACTIVE assignment that
    has not ended; the job becomes ``assigned``. Commits with its audit row.

    Raises NotFound, Conflict (job not pending/assigned, assignment not ACTIVE or over).
    """
    async with conn.transaction():
        before = await job_view(conn, job_id, lock=True)
        if before["status"] not in ("pending", "assigned"):
            raise Conflict(f"job {job_id} is {before['status']}; only a pending or assigned job can be"
                           " dispatched")
        assignment = await conn.fetchrow(
            "SELECT status, end_time, end_time IS NOT NULL AND end_time <= now() AS over"
            " FROM vehicle_assignments WHERE id = $1 FOR SHARE", assignment_id,
        )
        if assignment is None:
            raise NotFound(f"no assignment with id {assignment_id}")
        if assignment["status"] != "ACTIVE" or assignment["over"]:
            raise Conflict(f"assignment {assignment_id} is {assignment['status']}"
                           + (" and over" if assignment["over"] else "") + "; dispatch to an ACTIVE one")
        await conn.execute(
            "UPDATE transport_jobs SET assignment_id = $2, status = 'assigned' WHERE id = $1",
            job_id, assignment_id,
        )
        after = await job_view(conn, job_id)
        await audit.record(conn, actor=actor, action="job.assign", entity_type="job", entity_id=job_id,
                           before=before, after=after)
    return after


@requires("jobs:write")
async def set_job_status(conn: asyncpg.Connection, *, actor: str, job_id: UUID, status: str,
                         at: datetime | None = None) -> dict[str, Any]:
    """Moves a job along its life cycle (see the module docstring); ``delivered`` records
    ``delivered_at`` = ``at`` or now, ``pending`` releases the assignment. Use
    :func:`assign_job` to become ``assigned``. Commits with its audit row.

    Raises InvalidInput (a transition the life cycle does not allow), NotFound.
    """
    wanted = parse_choice(status, "status", JOB_STATUSES)
    if wanted == "assigned":
        raise InvalidInput("a job becomes assigned by dispatching it to an assignment (assign)")
    async with conn.transaction():
        before = await job_view(conn, job_id, lock=True)
        check_job_transition(before["status"], wanted)
        await conn.execute(
            "UPDATE transport_jobs SET status = $2,"
            " delivered_at = CASE WHEN $2 = 'delivered' THEN coalesce($3, now()) END,"
            " assignment_id = CASE WHEN $2 = 'pending' THEN NULL ELSE assignment_id END"
            " WHERE id = $1", job_id, wanted, at,
        )
        after = await job_view(conn, job_id)
        await audit.record(conn, actor=actor, action=f"job.{wanted}", entity_type="job",
                           entity_id=job_id, before=before, after=after)
    return after


@requires("jobs:write")
async def delete_job(conn: asyncpg.Connection, *, actor: str, job_id: UUID) -> dict[str, Any]:
    """Soft-deletes a pending or cancelled job; raises NotFound, Conflict."""
    async with conn.transaction():
        before = await job_view(conn, job_id, lock=True)
        if before["status"] not in ("pending", "cancelled"):
            raise Conflict(f"job {job_id} is {before['status']}; only pending or cancelled jobs can be"
                           " deleted (cancel it first)")
        await conn.execute("UPDATE transport_jobs SET deleted_at = now() WHERE id = $1", job_id)
        after = await job_view(conn, job_id, include_deleted=True)
        await audit.record(conn, actor=actor, action="job.delete", entity_type="job", entity_id=job_id,
                           before=before, after=after)
    return after


async def _open_job(conn: asyncpg.Connection, job_id: UUID) -> dict[str, Any]:
    view = await job_view(conn, job_id, lock=True)
    if view["status"] in ("delivered", "cancelled"):
        raise Conflict(f"job {job_id} is {view['status']} and can no longer change")
    return view


async def list_jobs(conn: asyncpg.Connection, *, customer_id: UUID | None = None,
                    status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Live jobs newest first (without route and cargo), by customer and/or status."""
    rows = await conn.fetch(
        "SELECT * FROM transport_jobs WHERE deleted_at IS NULL"
        " AND ($1::uuid IS NULL OR customer_id = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY created_at DESC LIMIT $3", customer_id, status, limit,
    )
    return [snapshot(r) or {} for r in rows]
