"""Drivers: register, update, soft-delete (seed 2.2), each with its audit row.

Only ``active`` drivers can be given new assignments. A driver with an ACTIVE
assignment that has not ended cannot be deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import assignments, entities
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.errors import NotFound
from fleet_telemetry.fleetops.validation import driver_fields

DRIVER = entities.Kind(
    table="drivers",
    name="driver",
    columns=("name", "license_number", "status", "user_id"),
    unique={"drivers_license_number_key": "license_number", "drivers_user_id_key": "user_id"},
)


@requires("drivers:write")
async def register_driver(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                          driver_id: UUID | None = None) -> dict[str, Any]:
    """Registers a driver (``name`` required); commits with its audit row.

    Raises InvalidInput, NotFound (``user_id`` names no user), Conflict (licence number
    or user account held by a live driver).
    """
    values = driver_fields(data)
    try:
        row = await entities.register(conn, DRIVER, actor=actor, values=values, entity_id=driver_id)
    except asyncpg.exceptions.ForeignKeyViolationError:
        raise NotFound(f"no user with id {values.get('user_id')}") from None
    return snapshot(row) or {}


@requires("drivers:write")
async def update_driver(conn: asyncpg.Connection, *, actor: str, driver_id: UUID,
                        changes: Mapping[str, Any]) -> dict[str, Any]:
    """Changes the given fields of a live driver; commits with its audit row.

    Raises InvalidInput, NotFound, Conflict.
    """
    values = driver_fields(changes, partial=True)
    try:
        _, after = await entities.update(conn, DRIVER, actor=actor, entity_id=driver_id, values=values)
    except asyncpg.exceptions.ForeignKeyViolationError:
        raise NotFound(f"no user with id {values.get('user_id')}") from None
    return snapshot(after) or {}


@requires("drivers:write")
async def delete_driver(conn: asyncpg.Connection, *, actor: str, driver_id: UUID) -> dict[str, Any]:
    """Soft-deletes a driver; raises NotFound, Conflict (an ACTIVE assignment not ended)."""
    async with conn.transaction():
        await entities.fetch_live(conn, DRIVER, driver_id, lock=True)
        await assignments.refuse_open_bookings(conn, "driver", driver_id)
        row = await entities.soft_delete(conn, DRIVER, actor=actor, entity_id=driver_id)
    return snapshot(row) or {}


async def get_driver(conn: asyncpg.Connection, driver_id: UUID) -> dict[str, Any]:
    """The live driver; raises NotFound."""
    return snapshot(await entities.fetch_live(conn, DRIVER, driver_id)) or {}


async def list_drivers(conn: asyncpg.Connection, *, status: str | None = None,
                       limit: int = 100) -> list[dict[str, Any]]:
    """Live drivers, newest first, optionally of one status."""
    rows = await entities.list_live(conn, DRIVER, where="$1::text IS NULL OR status = $1",
                                    params=(status,), limit=limit)
    return [snapshot(r) or {} for r in rows]
