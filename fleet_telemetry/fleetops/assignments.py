"""Vehicle assignments: who drives what, when (seed 2.2, 7.1 A): create, end, cancel.

The no-overlap rule lives in the database: the exclusion constraints
``vehicle_assignments_no_vehicle_overlap`` and ``vehicle_assignments_no_driver_overlap``
refuse a second ACTIVE booking of a vehicle or a driver over ``[start, end)``. This
module turns their violation into :class:`DoubleBooking`, naming the assignment already
there and its period, looked up after the refused insert.

Life cycle: ``ACTIVE`` (booked; past, present or future) -> ``COMPLETED`` (ended: the
end time is set to when it ended, no later than now) or ``CANCELLED`` (called off).
Only ACTIVE assignments block a period.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.errors import Conflict, DoubleBooking, InvalidInput, NotFound
from fleet_telemetry.fleetops.validation import OPEN_JOB_STATUSES
from fleet_telemetry.fleetops.values import check_period

_CONSTRAINT_RESOURCE = {
    "vehicle_assignments_no_vehicle_overlap": "vehicle",
    "vehicle_assignments_no_driver_overlap": "driver",
}

# The ACTIVE booking of one vehicle (or driver) overlapping [$2, $3); served by the
# exclusion constraint's GiST index.
_OVERLAPPING = """
SELECT id, start_time, end_time FROM vehicle_assignments
 WHERE {column} = $1 AND status = 'ACTIVE'
   AND tstzrange(start_time, end_time, '[)') && tstzrange($2, $3, '[)')
 ORDER BY start_time LIMIT 1
"""

_OPEN_BOOKING = """
SELECT id, start_time, end_time FROM vehicle_assignments
 WHERE {column} = $1 AND status = 'ACTIVE' AND (end_time IS NULL OR end_time > now())
 ORDER BY start_time LIMIT 1
"""


@requires("assignments:write")
async def create_assignment(
    conn: asyncpg.Connection,
    *,
    actor: str,
    vehicle_id: UUID,
    driver_id: UUID,
    start_time: datetime,
    end_time: datetime | None = None,
    assignment_id: UUID | None = None,
) -> dict[str, Any]:
    """Books ``driver_id`` on ``vehicle_id`` over ``[start_time, end_time)`` (open-ended if
    ``end_time`` is None); commits the ACTIVE assignment with its audit row.

    Raises InvalidInput (end not after start), NotFound (unknown or deleted vehicle or
    driver), Conflict (retired vehicle, driver not active), DoubleBooking.
    """
    check_period(start_time, end_time)
    try:
        async with conn.transaction():
            vehicle = await conn.fetchrow(
                "SELECT status FROM vehicles WHERE id = $1 AND deleted_at IS NULL FOR SHARE", vehicle_id
            )
            if vehicle is None:
                raise NotFound(f"no vehicle with id {vehicle_id} (unknown, or deleted)")
            if vehicle["status"] == "retired":
                raise Conflict(f"vehicle {vehicle_id} is retired and cannot be assigned")
            driver = await conn.fetchrow(
                "SELECT status FROM drivers WHERE id = $1 AND deleted_at IS NULL FOR SHARE", driver_id
            )
            if driver is None:
                raise NotFound(f"no driver with id {driver_id} (unknown, or deleted)")
            if driver["status"] != "active":
                raise Conflict(f"driver {driver_id} is {driver['status']} and cannot be assigned")
            row = await conn.fetchrow(
                "INSERT INTO vehicle_assignments (id, vehicle_id, driver_id, start_time, end_time)"
                " VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5) RETURNING *",
                assignment_id, vehicle_id, driver_id, start_time, end_time,
            )
            await audit.record(conn, actor=actor, action="assignment.create", entity_type="assignment",
                               entity_id=row["id"], before=None, after=snapshot(row))
    except asyncpg.exceptions.ExclusionViolationError as exc:
        resource = _CONSTRAINT_RESOURCE.get(exc.constraint_name or "")
        if resource is None:
            raise
        resource_id = vehicle_id if resource == "vehicle" else driver_id
        other = await conn.fetchrow(_OVERLAPPING.format(column=f"{resource}_id"),
                                    resource_id, start_time, end_time)
        if other is None:  # the other booking was ended or cancelled meanwhile
            raise Conflict(f"{resource} {resource_id} was booked over this period by an assignment"
                           " that has just changed; try again") from None
        raise DoubleBooking(resource, resource_id, other["id"], other["start_time"],
                            other["end_time"]) from None
    except asyncpg.exceptions.UniqueViolationError:
        raise Conflict(f"an assignment with id {assignment_id} exists already") from None
    return snapshot(row) or {}


@requires("assignments:write")
async def end_assignment(conn: asyncpg.Connection, *, actor: str, assignment_id: UUID,
                         at: datetime | None = None) -> dict[str, Any]:
    """Ends an ACTIVE assignment at ``at`` (default now; not in the future): its end time
    becomes ``at`` and its status COMPLETED. Commits with its audit row.

    Raises NotFound, Conflict (not ACTIVE, or open jobs on it), InvalidInput (``at`` in
    the future, not after the start — cancel it instead — or after its planned end).
    """
    async with conn.transaction():
        before = await _lock(conn, assignment_id)
        now = await conn.fetchval("SELECT now()")
        end = at or now
        if end > now:
            raise InvalidInput(f"end time {end.isoformat()} is in the future; an assignment ends when"
                               " it is over (to shorten a booking, cancel it and book again)")
        if end <= before["start_time"]:
            raise InvalidInput(f"assignment {assignment_id} starts at {before['start_time'].isoformat()},"
                               f" after {end.isoformat()}: cancel it instead")
        if before["end_time"] is not None and end > before["end_time"]:
            raise InvalidInput(f"assignment {assignment_id} already ends at {before['end_time'].isoformat()}")
        await _refuse_open_jobs(conn, assignment_id)
        after = await conn.fetchrow(
            "UPDATE vehicle_assignments SET end_time = $2, status = 'COMPLETED' WHERE id = $1 RETURNING *",
            assignment_id, end,
        )
        await audit.record(conn, actor=actor, action="assignment.end", entity_type="assignment",
                           entity_id=assignment_id, before=snapshot(before), after=snapshot(after))
    return snapshot(after) or {}


@requires("assignments:write")
async def cancel_assignment(conn: asyncpg.Connection, *, actor: str,
                            assignment_id: UUID) -> dict[str, Any]:
    """Cancels an ACTIVE assignment: its period is free again. Commits with its audit row.

    Raises NotFound, Conflict (not ACTIVE, or open jobs on it).
    """
    async with conn.transaction():
        before = await _lock(conn, assignment_id)
        await _refuse_open_jobs(conn, assignment_id)
        after = await conn.fetchrow(
            "UPDATE vehicle_assignments SET status = 'CANCELLED' WHERE id = $1 RETURNING *", assignment_id
        )
        await audit.record(conn, actor=actor, action="assignment.cancel", entity_type="assignment",
                           entity_id=assignment_id, before=snapshot(before), after=snapshot(after))
    return snapshot(after) or {}


async def _lock(conn: asyncpg.Connection, assignment_id: UUID) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM vehicle_assignments WHERE id = $1 FOR UPDATE", assignment_id)
    if row is None:
        raise NotFound(f"no assignment with id {assignment_id}")
    if row["status"] != "ACTIVE":
        raise Conflict(f"assignment {assignment_id} is {row['status']}; only an ACTIVE one can change")
    return row


async def _refuse_open_jobs(conn: asyncpg.Connection, assignment_id: UUID) -> None:
    job = await conn.fetchval(
        "SELECT id FROM transport_jobs WHERE assignment_id = $1 AND deleted_at IS NULL"
        " AND status = ANY($2::text[]) LIMIT 1", assignment_id, list(OPEN_JOB_STATUSES),
    )
    if job is not None:
        raise Conflict(f"assignment {assignment_id} carries open job {job}: deliver, cancel or"
                       " reassign it first")


async def refuse_open_bookings(conn: asyncpg.Connection, resource: str, resource_id: UUID) -> None:
    """Raises Conflict if the vehicle or driver has an ACTIVE assignment not yet ended."""
    row = await conn.fetchrow(_OPEN_BOOKING.format(column=f"{resource}_id"), resource_id)
    if row is not None:
        until = row["end_time"].isoformat() if row["end_time"] else "open end"
        raise Conflict(f"{resource} {resource_id} has ACTIVE assignment {row['id']} from"
                       f" {row['start_time'].isoformat()} to {until}: end or cancel it first")


async def get_assignment(conn: asyncpg.Connection, assignment_id: UUID) -> dict[str, Any]:
    """One assignment, any status; raises NotFound."""
    row = await conn.fetchrow("SELECT * FROM vehicle_assignments WHERE id = $1", assignment_id)
    if row is None:
        raise NotFound(f"no assignment with id {assignment_id}")
    return snapshot(row) or {}


async def list_assignments(conn: asyncpg.Connection, *, vehicle_id: UUID | None = None,
                           driver_id: UUID | None = None, status: str | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
    """Assignments newest first, by vehicle, driver and/or status."""
    rows = await conn.fetch(
        "SELECT * FROM vehicle_assignments WHERE ($1::uuid IS NULL OR vehicle_id = $1)"
        " AND ($2::uuid IS NULL OR driver_id = $2) AND ($3::text IS NULL OR status = $3)"
        " ORDER BY start_time DESC LIMIT $4",
        vehicle_id, driver_id, status, limit,
    )
    return [snapshot(r) or {} for r in rows]
