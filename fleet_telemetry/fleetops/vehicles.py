"""Vehicles: register, update, soft-delete (seed 2.2), each with its audit row.

A vehicle's maintenance triggers follow its ``type``: registering a vehicle, or changing
its type, creates the triggers of the schedules for that type; retiring or deleting it
switches them off. A vehicle with an ACTIVE assignment that has not ended cannot be
deleted (end or cancel the assignment first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import assignments, entities, maintenance
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.errors import Conflict, NotFound
from fleet_telemetry.fleetops.validation import vehicle_fields

VEHICLE = entities.Kind(
    table="vehicles",
    name="vehicle",
    columns=("vin", "license_plate", "make", "model", "year", "type", "status", "specs"),
    unique={"vehicles_vin_key": "vin", "vehicles_license_plate_key": "license_plate"},
)

# VIN and plate as the writers store them (upper case, a VIN without spaces); both
# unique among live vehicles, each served by its unique index.
_BY_VIN_OR_PLATE = """
SELECT id, vin, license_plate FROM vehicles
WHERE deleted_at IS NULL AND (vin = $1 OR license_plate = $2)
ORDER BY vin = $1 DESC
"""


async def resolve_vehicle(conn: asyncpg.Connection, text: str) -> UUID:
    """The vehicle an operator names by its id, VIN or licence plate (any case).

    An id names any vehicle, deleted ones too (their history stays); a VIN or plate a
    live one. Raises NotFound, and Conflict when the text is one vehicle's VIN and
    another's plate.
    """
    given = text.strip()
    try:
        vehicle_id: UUID | None = UUID(given)
    except ValueError:
        vehicle_id = None
    if vehicle_id is not None:
        if await conn.fetchval("SELECT 1 FROM vehicles WHERE id = $1", vehicle_id) is None:
            raise NotFound(f"no vehicle with id {vehicle_id}")
        return vehicle_id
    rows = await conn.fetch(_BY_VIN_OR_PLATE, given.upper().replace(" ", ""), given.upper())
    if not rows:
        raise NotFound(f"no vehicle with id, VIN or plate {given!r} (see 'fleet vehicles list')")
    if len(rows) > 1:
        raise Conflict(f"{given!r} is the VIN of vehicle {rows[0]['id']} and the plate of vehicle {rows[1]['id']};"
                       " name it by its id")
    return rows[0]["id"]  # type: ignore[no-any-return]


@requires("vehicles:write")
async def register_vehicle(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                           vehicle_id: UUID | None = None) -> dict[str, Any]:
    """Registers a vehicle (``vin`` and ``license_plate`` required) and creates its
    maintenance triggers; commits both with their audit rows. Returns the new row.

    Raises InvalidInput (bad field), Conflict (VIN or plate held by a live vehicle).
    """
    values = vehicle_fields(data)
    async with conn.transaction():
        row = await entities.register(conn, VEHICLE, actor=actor, values=values, entity_id=vehicle_id)
        await maintenance.sync_triggers(conn, actor=actor, vehicle_id=row["id"])
    return snapshot(row) or {}


@requires("vehicles:write")
async def update_vehicle(conn: asyncpg.Connection, *, actor: str, vehicle_id: UUID,
                         changes: Mapping[str, Any]) -> dict[str, Any]:
    """Changes the given fields of a live vehicle; commits with its audit row.

    Raises InvalidInput, NotFound, Conflict (VIN or plate taken).
    """
    values = vehicle_fields(changes, partial=True)
    async with conn.transaction():
        before, after = await entities.update(conn, VEHICLE, actor=actor, entity_id=vehicle_id, values=values)
        if before["type"] != after["type"] or before["status"] != after["status"]:
            await maintenance.sync_triggers(conn, actor=actor, vehicle_id=vehicle_id)
    return snapshot(after) or {}


@requires("vehicles:write")
async def delete_vehicle(conn: asyncpg.Connection, *, actor: str, vehicle_id: UUID) -> dict[str, Any]:
    """Soft-deletes a vehicle (its VIN and plate become free) and switches its triggers off.

    Raises NotFound, Conflict (an ACTIVE assignment that has not ended).
    """
    async with conn.transaction():
        await entities.fetch_live(conn, VEHICLE, vehicle_id, lock=True)
        await assignments.refuse_open_bookings(conn, "vehicle", vehicle_id)
        row = await entities.soft_delete(conn, VEHICLE, actor=actor, entity_id=vehicle_id)
        await maintenance.sync_triggers(conn, actor=actor, vehicle_id=vehicle_id)
    return snapshot(row) or {}


async def get_vehicle(conn: asyncpg.Connection, vehicle_id: UUID) -> dict[str, Any]:
    """The live vehicle; raises NotFound."""
    return snapshot(await entities.fetch_live(conn, VEHICLE, vehicle_id)) or {}


async def list_vehicles(conn: asyncpg.Connection, *, status: str | None = None, type: str | None = None,
                        limit: int = 100) -> list[dict[str, Any]]:
    """Live vehicles, newest first, optionally of one status and/or type."""
    rows = await entities.list_live(
        conn, VEHICLE, where="($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR type = $2)",
        params=(status, type), limit=limit,
    )
    return [snapshot(r) or {} for r in rows]
