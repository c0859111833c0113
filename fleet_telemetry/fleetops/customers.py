"""Customers: register, update, soft-delete (seed 2.3), each with its audit row.

A customer with open jobs (pending, assigned, in transit) cannot be deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import entities
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.errors import Conflict
from fleet_telemetry.fleetops.validation import OPEN_JOB_STATUSES, customer_fields

CUSTOMER = entities.Kind(
    table="customers",
    name="customer",
    columns=("name", "contact_info", "billing_address"),
)


@requires("customers:write")
async def register_customer(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                            customer_id: UUID | None = None) -> dict[str, Any]:
    """Registers a customer (``name`` required); commits with its audit row."""
    row = await entities.register(conn, CUSTOMER, actor=actor, values=customer_fields(data),
                                  entity_id=customer_id)
    return snapshot(row) or {}


@requires("customers:write")
async def update_customer(conn: asyncpg.Connection, *, actor: str, customer_id: UUID,
                          changes: Mapping[str, Any]) -> dict[str, Any]:
    """Changes the given fields of a live customer; raises InvalidInput, NotFound."""
    _, after = await entities.update(conn, CUSTOMER, actor=actor, entity_id=customer_id,
                                     values=customer_fields(changes, partial=True))
    return snapshot(after) or {}


@requires("customers:write")
async def delete_customer(conn: asyncpg.Connection, *, actor: str, customer_id: UUID) -> dict[str, Any]:
    """Soft-deletes a customer; raises NotFound, Conflict (open jobs)."""
    async with conn.transaction():
        await entities.fetch_live(conn, CUSTOMER, customer_id, lock=True)
        open_job = await conn.fetchval(
            "SELECT id FROM transport_jobs WHERE customer_id = $1 AND deleted_at IS NULL"
            " AND status = ANY($2::text[]) LIMIT 1", customer_id, list(OPEN_JOB_STATUSES),
        )
        if open_job is not None:
            raise Conflict(f"customer {customer_id} has open job {open_job}: deliver or cancel it first")
        row = await entities.soft_delete(conn, CUSTOMER, actor=actor, entity_id=customer_id)
    return snapshot(row) or {}


async def get_customer(conn: asyncpg.Connection, customer_id: UUID) -> dict[str, Any]:
    """The live customer; raises NotFound."""
    return snapshot(await entities.fetch_live(conn, CUSTOMER, customer_id)) or {}


async def list_customers(conn: asyncpg.Connection, *, limit: int = 100) -> list[dict[str, Any]]:
    """Live customers by name."""
    rows = await entities.list_live(conn, CUSTOMER, order="name", limit=limit)
    return [snapshot(r) or {} for r in rows]
