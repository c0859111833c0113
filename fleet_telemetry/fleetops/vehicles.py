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
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.validation import vehicle_fields

VEHICLE = entities.Kind(
    table="vehicles",
    name="vehicle",
    columns=("vin", "license_plate", "make", "model", "year", "type", "status", "specs"),
    unique={"vehicles_vin_key": "vin", "vehicles_license_plate_key": "license_plate"},
)


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
