"""Maintenance: service records, recurring schedules and the triggers saying when each
schedule is next due for each vehicle (seed 2.4, 7.2), every change audited.

A schedule applies to the vehicles of its ``vehicle_type`` and is satisfied by services
whose ``type`` equals the schedule's ``name`` (``oil_change``, ...). Each (vehicle,
schedule) pair has one trigger. Recording a service moves the matching triggers
forward: last service = this one, next due date = its date + ``interval_months``, next
due odometer = its odometer + ``interval_km`` (unknown when the service has no odometer
reading). A service dated before the trigger's last one changes nothing. Until a first
service, a trigger is due ``interval_months`` after the vehicle's registration (or after
the newest earlier service of that type) and its odometer due is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.entities import insert_row, update_row
from fleet_telemetry.fleetops.errors import Conflict, InvalidInput, NotFound
from fleet_telemetry.fleetops.validation import next_due, schedule_fields, service_fields

# The (vehicle, schedule) pairs that should have an active trigger, with the newest
# service that satisfies each: live, non-retired vehicles of the schedule's type.
_WANTED_PAIRS = """
SELECT v.id AS vehicle_id, s.id AS schedule_id, s.interval_km, s.interval_months,
       v.created_at::date AS registered, last.date AS last_date, last.odometer_km AS last_km
  FROM vehicles v
  JOIN maintenance_schedules s ON s.vehicle_type = v.type
  LEFT JOIN maintenance_triggers t ON t.vehicle_id = v.id AND t.schedule_id = s.id
  LEFT JOIN LATERAL (
        SELECT r.date, r.odometer_km FROM maintenance_records r
         WHERE r.vehicle_id = v.id AND r.type = s.name
         ORDER BY r.date DESC, r.created_at DESC LIMIT 1) last ON true
 WHERE v.deleted_at IS NULL AND v.status <> 'retired'
   AND ($1::uuid IS NULL OR v.id = $1) AND ($2::uuid IS NULL OR s.id = $2)
   AND (t.id IS NULL OR NOT t.is_active)
"""

# Creates (or re-activates) triggers and writes one audit row per trigger, in one statement.
_UPSERT_TRIGGERS = """
WITH input AS (
    SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::date[], $5::float8[], $6::date[], $7::float8[])
        AS u(vehicle_id, schedule_id, last_service_date, last_service_km, next_due_date, next_due_km)
), written AS (
    INSERT INTO maintenance_triggers AS t
           (vehicle_id, schedule_id, last_service_date, last_service_km, next_due_date, next_due_km)
    SELECT * FROM input
    ON CONFLICT (vehicle_id, schedule_id) DO UPDATE
       SET last_service_date = excluded.last_service_date, last_service_km = excluded.last_service_km,
           next_due_date = excluded.next_due_date, next_due_km = excluded.next_due_km, is_active = true
    RETURNING t.*
)
INSERT INTO audit_logs (actor, action, entity_type, entity_id, before, after)
SELECT $1, 'maintenance_trigger.activate', 'maintenance_trigger', id::text, NULL, to_jsonb(written)
  FROM written
"""

# Switches off the triggers whose vehicle is gone, retired or of another type now.
_DEACTIVATE = """
WITH gone AS (
    UPDATE maintenance_triggers t SET is_active = false
      FROM vehicles v, maintenance_schedules s
     WHERE t.vehicle_id = v.id AND t.schedule_id = s.id AND t.is_active
       AND ($2::uuid IS NULL OR t.vehicle_id = $2) AND ($3::uuid IS NULL OR t.schedule_id = $3)
       AND (v.deleted_at IS NOT NULL OR v.status = 'retired' OR v.type <> s.vehicle_type)
    RETURNING t.*
)
INSERT INTO audit_logs (actor, action, entity_type, entity_id, before, after)
SELECT $1, 'maintenance_trigger.deactivate', 'maintenance_trigger', id::text, NULL, to_jsonb(gone)
  FROM gone
"""


async def sync_triggers(conn: asyncpg.Connection, *, actor: str, vehicle_id: UUID | None = None,
                        schedule_id: UUID | None = None) -> None:
    """Makes the triggers of one vehicle (or one schedule) match the rule of the module
    docstring: creates the missing ones, switches off those that no longer apply. Runs
    in the caller's transaction; audit rows for each trigger written."""
    await conn.execute(_DEACTIVATE, actor, vehicle_id, schedule_id)
    pairs = await conn.fetch(_WANTED_PAIRS, vehicle_id, schedule_id)
    if not pairs:
        return
    columns: list[list[Any]] = [[], [], [], [], [], []]
    for p in pairs:
        due_date, due_km = next_due(p["last_date"] or p["registered"], p["last_km"],
                                    p["interval_months"], p["interval_km"])
        if due_date is None and due_km is None:
            # A distance-only schedule and no service recorded yet: there is no odometer
            # to count from, so the trigger starts with the vehicle's first service.
            continue
        for column, value in zip(columns, (p["vehicle_id"], p["schedule_id"], p["last_date"],
                                           p["last_km"], due_date, due_km)):
            column.append(value)
    if columns[0]:
        await conn.execute(_UPSERT_TRIGGERS, actor, *columns)


@requires("maintenance:write")
async def record_service(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                         record_id: UUID | None = None) -> dict[str, Any]:
    """Stores a service of a live vehicle and moves its matching triggers forward; commits
    the record, the triggers and their audit rows together.

    Returns ``{"record": ..., "triggers": [...]}`` with the triggers after the change.
    Raises InvalidInput, NotFound (unknown or deleted vehicle), Conflict (the id exists).
    """
    values = service_fields(data)
    vehicle_id: UUID = values["vehicle_id"]
    async with conn.transaction():
        if await conn.fetchval("SELECT id FROM vehicles WHERE id = $1 AND deleted_at IS NULL FOR SHARE",
                               vehicle_id) is None:
            raise NotFound(f"no vehicle with id {vehicle_id} (unknown, or deleted)")
        await sync_triggers(conn, actor=actor, vehicle_id=vehicle_id)
        try:
            async with conn.transaction():
                row = await insert_row(conn, "maintenance_records", values, row_id=record_id)
        except asyncpg.exceptions.UniqueViolationError:
            raise Conflict(f"a service record with id {record_id} exists already") from None
        await audit.record(conn, actor=actor, action="maintenance_record.create",
                           entity_type="maintenance_record", entity_id=row["id"], before=None,
                           after=snapshot(row))
        triggers = await conn.fetch(
            "SELECT t.*, s.interval_km, s.interval_months FROM maintenance_triggers t"
            " JOIN maintenance_schedules s ON s.id = t.schedule_id"
            " WHERE t.vehicle_id = $1 AND s.name = $2 AND t.is_active FOR UPDATE OF t",
            vehicle_id, values["type"],
        )
        moved = []
        for trigger in triggers:
            if trigger["last_service_date"] is not None and row["date"] < trigger["last_service_date"]:
                continue
            due_date, due_km = next_due(row["date"], row["odometer_km"], trigger["interval_months"],
                                        trigger["interval_km"])
            after = await conn.fetchrow(
                "UPDATE maintenance_triggers SET last_service_date = $2, last_service_km = $3,"
                " next_due_date = $4, next_due_km = $5 WHERE id = $1 RETURNING *",
                trigger["id"], row["date"], row["odometer_km"], due_date, due_km,
            )
            before = {k: v for k, v in (snapshot(trigger) or {}).items()
                      if k not in ("interval_km", "interval_months")}
            await audit.record(conn, actor=actor, action="maintenance_trigger.service",
                               entity_type="maintenance_trigger", entity_id=trigger["id"],
                               before=before, after=snapshot(after))
            moved.append(snapshot(after))
    return {"record": snapshot(row), "triggers": moved}


@requires("maintenance:write")
async def create_schedule(conn: asyncpg.Connection, *, actor: str, data: Mapping[str, Any],
                          schedule_id: UUID | None = None) -> dict[str, Any]:
    """Creates a recurring rule for a vehicle type and the triggers of its vehicles;
    commits them with their audit rows. Raises InvalidInput, Conflict (name taken for
    the type)."""
    values = schedule_fields(data)
    try:
        async with conn.transaction():
            row = await insert_row(conn, "maintenance_schedules", values, row_id=schedule_id)
            await audit.record(conn, actor=actor, action="maintenance_schedule.create",
                               entity_type="maintenance_schedule", entity_id=row["id"], before=None,
                               after=snapshot(row))
            await sync_triggers(conn, actor=actor, schedule_id=row["id"])
    except asyncpg.exceptions.UniqueViolationError:
        raise Conflict(f"vehicle type {values['vehicle_type']} already has a schedule named"
                       f" {values['name']} (or the id exists)") from None
    return snapshot(row) or {}


@requires("maintenance:write")
async def update_schedule(conn: asyncpg.Connection, *, actor: str, schedule_id: UUID,
                          changes: Mapping[str, Any]) -> dict[str, Any]:
    """Changes a schedule's intervals and recomputes the next due values of its active
    triggers from their last service; commits with the audit rows.

    Raises InvalidInput (no interval left), NotFound.
    """
    values = schedule_fields(changes, partial=True)
    async with conn.transaction():
        before = await conn.fetchrow("SELECT * FROM maintenance_schedules WHERE id = $1 FOR UPDATE",
                                     schedule_id)
        if before is None:
            raise NotFound(f"no maintenance schedule with id {schedule_id}")
        try:
            async with conn.transaction():
                after = await update_row(conn, "maintenance_schedules", schedule_id, values)
        except asyncpg.exceptions.CheckViolationError:
            raise InvalidInput("a schedule needs 'interval_km', 'interval_months' or both") from None
        await audit.record(conn, actor=actor, action="maintenance_schedule.update",
                           entity_type="maintenance_schedule", entity_id=schedule_id,
                           before=snapshot(before), after=snapshot(after))
        triggers = await conn.fetch(
            "SELECT t.*, v.created_at::date AS registered FROM maintenance_triggers t"
            " JOIN vehicles v ON v.id = t.vehicle_id WHERE t.schedule_id = $1 AND t.is_active"
            " FOR UPDATE OF t", schedule_id,
        )
        ids, dates, kms = [], [], []
        for t in triggers:
            due_date, due_km = next_due(t["last_service_date"] or t["registered"], t["last_service_km"],
                                        after["interval_months"], after["interval_km"])
            ids.append(t["id"])
            dates.append(due_date)
            kms.append(due_km)
        await conn.execute(
            """
            WITH changed AS (
                UPDATE maintenance_triggers t SET next_due_date = u.d, next_due_km = u.k
                  FROM unnest($2::uuid[], $3::date[], $4::float8[]) AS u(id, d, k)
                 WHERE t.id = u.id RETURNING t.*
            )
            INSERT INTO audit_logs (actor, action, entity_type, entity_id, before, after)
            SELECT $1, 'maintenance_trigger.reschedule', 'maintenance_trigger', id::text, NULL,
                   to_jsonb(changed) FROM changed
            """, actor, ids, dates, kms,
        )
    return snapshot(after) or {}


async def due_triggers(conn: asyncpg.Connection, *, before: date, limit: int = 100) -> list[dict[str, Any]]:
    """Active triggers due before ``before`` (overdue when ``before`` is today), soonest
    first, with the vehicle's plate and the schedule's name; served by idx_maintenance_overdue."""
    rows = await conn.fetch(
        "SELECT t.*, v.license_plate, s.name AS schedule FROM maintenance_triggers t"
        " JOIN vehicles v ON v.id = t.vehicle_id JOIN maintenance_schedules s ON s.id = t.schedule_id"
        " WHERE t.is_active AND t.next_due_date IS NOT NULL AND t.next_due_date < $1"
        " ORDER BY t.next_due_date LIMIT $2", before, limit,
    )
    return [snapshot(r) or {} for r in rows]


async def vehicle_triggers(conn: asyncpg.Connection, vehicle_id: UUID) -> list[dict[str, Any]]:
    """All triggers of a vehicle with their schedule's name, soonest due first."""
    rows = await conn.fetch(
        "SELECT t.*, s.name AS schedule FROM maintenance_triggers t"
        " JOIN maintenance_schedules s ON s.id = t.schedule_id WHERE t.vehicle_id = $1"
        " ORDER BY t.next_due_date NULLS LAST", vehicle_id,
    )
    return [snapshot(r) or {} for r in rows]


async def list_records(conn: asyncpg.Connection, vehicle_id: UUID, *, limit: int = 100) -> list[dict[str, Any]]:
    """A vehicle's service history, newest first."""
    rows = await conn.fetch(
        "SELECT * FROM maintenance_records WHERE vehicle_id = $1 ORDER BY date DESC, created_at DESC"
        " LIMIT $2", vehicle_id, limit,
    )
    return [snapshot(r) or {} for r in rows]
